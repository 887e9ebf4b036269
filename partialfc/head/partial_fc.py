"""The sharded Partial FC classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from partialfc import dist as pdist
from partialfc.errors import InputError
from partialfc.head.inputs import (STATUS_WIDTH, all_finite, columns_as_labels, input_error, labels_as_columns,
                                   local_status, well_formed)
from partialfc.head.sampler import CentreSampler
from partialfc.head.sharding import shard_range
from partialfc.losses import CosFace
from partialfc.losses.base import MarginLoss
from partialfc.ops.fused import DEFAULT_CHUNK
from partialfc.ops.collectives import all_gather, gather_rows, gather_sizes
from partialfc.ops.implementation import Implementation
from partialfc.ops.targets import Targets
from partialfc.seeding import Stream, seeded_generator

INIT_BLOCK = 65536  # classes per independently seeded init block
MAX_PENDING = 64  # bounded input checks kept before the head reads them itself


def init_centres(class_start: int, num_local: int, dim: int, std: float, seed: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Normal(0, std) rows for global classes ``[class_start, class_start+num_local)``, drawn
    on ``device`` (a 10^7-class shard drawn on the CPU and copied over takes minutes).

    Rows are drawn in fixed global blocks seeded by ``(seed, block)``, so the global matrix
    is the same whatever the number of ranks (for one device type: the CPU and CUDA
    generators differ), and no rank materialises more than its shard plus one block."""
    out = torch.empty((num_local, dim), dtype=dtype, device=device)
    end = class_start + num_local
    for block in range(class_start // INIT_BLOCK, (end - 1) // INIT_BLOCK + 1 if num_local else 0):
        lo, hi = block * INIT_BLOCK, (block + 1) * INIT_BLOCK
        gen = seeded_generator(seed, Stream.HEAD_INIT, block, device=out.device)
        rows = torch.empty((INIT_BLOCK, dim), dtype=dtype, device=out.device).normal_(0.0, std, generator=gen)
        a, b = max(lo, class_start), min(hi, end)
        out[a - class_start: b - class_start] = rows[a - lo: b - lo]
    return out


def resolve_sample_rate(requested: float | None, loss_rate: float | None) -> float:
    """The head's rate: as requested, else the one a sampled loss implies (D-Softmax-B: 0,
    D-Softmax-K: 1/K), else 1. A request that contradicts the loss is an error."""
    if loss_rate is None:
        return 1.0 if requested is None else requested
    if requested is not None and abs(requested - loss_rate) > 1e-12:
        raise ValueError(f"sample_rate={requested} contradicts the loss, which samples at rate {loss_rate}")
    return loss_rate


def resolve_fused(fused: bool | str | Implementation, loss: nn.Module) -> Implementation:
    """The head's ``fused`` setting (an :class:`Implementation` or its name, in any case;
    ``True`` / ``False``: ``torch`` / ``plain``) as ``torch``, ``triton`` or ``plain``."""
    if isinstance(fused, bool):
        fused = Implementation.torch if fused else Implementation.plain
    choice = Implementation.parse(fused, "fused", also=" or a bool")
    if choice is Implementation.auto:
        return Implementation.torch if isinstance(loss, MarginLoss) else Implementation.plain
    if choice is not Implementation.plain and not isinstance(loss, MarginLoss):
        raise ValueError(f"fused='{choice}' needs a MarginLoss (it reads psi and the objective), "
                         f"got {type(loss).__name__}")
    return choice


NONFINITE = ("raise", "report")  # PartialFC(nonfinite=...)


def _mean(per_row: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The mean of the per-row losses ``(B,)`` over the rows ``valid`` marks (all: None)."""
    if valid is None:
        return per_row.mean()
    return torch.where(valid, per_row, 0.0).sum() / valid.sum()


class PartialFC(nn.Module):
    """Model-parallel margin-softmax classifier with per-step sampling of class centres.

    ``head(local_embeddings (b, D), local_labels (b,) int) -> scalar`` mean loss over the
    global batch, identical on every rank of ``process_group`` (default group, or a single
    process when none is initialised). ``weight`` is this rank's shard ``(num_local, D)`` of
    global classes ``[class_start, class_start + num_local)``.

    ``sample_rate=None`` takes the rate the loss asks for (``loss.sample_rate``, e.g. the
    D-Softmax-B/K variants), or 1.0 (no sampling).

    With ``sample_rate < 1`` the sampled rows are looked up with a sparse-gradient embedding,
    so ``weight.grad`` is a sparse tensor holding only the sampled rows; step it with
    :class:`partialfc.head.optim.SparseRowSGD` or :class:`~partialfc.head.optim.SparseRowAdamW`.

    ``fused`` (an :class:`~partialfc.ops.implementation.Implementation` or its name) picks
    how the loss runs over the sampled centres (the same result up to rounding; see
    :mod:`partialfc.ops.fused`): ``torch`` walks the centres in chunks of ``fused_chunk`` and
    never holds the ``(B, k)`` cosines or logits (any device); ``triton`` is the same walk as
    a Triton kernel (CUDA); ``plain`` forms ``cos (B, k)`` and runs the loss's plain
    objective (the reference); ``auto`` (default) is ``torch`` for a
    :class:`~partialfc.losses.base.MarginLoss` and ``plain`` for any other loss module.
    ``True`` / ``False`` mean ``torch`` / ``plain``. The resolved member is :attr:`fused`.

    ``nonfinite``: what NaN or inf in any rank's embeddings does: ``"raise"`` an
    :class:`~partialfc.errors.InputError` on every rank, or ``"report"`` it as a NaN loss on
    every rank (whose backward reaches the backbone only), for a trainer that skips the step.

    ``dtype`` is the storage dtype of the centres: ``torch.bfloat16`` halves the bytes per
    class (the sparse-row optimizers then keep their state in bf16 too and round
    stochastically); the loss still accumulates in fp32.

    ``compute_dtype``: the dtype of the head's matmuls (``torch.bfloat16`` / ``float16``) when
    the caller runs no autocast, as under a DeepSpeed engine that casts the backbone itself;
    the head then autocasts itself, so the run's precision holds whatever the engine (the
    reductions stay fp32). None (default): the caller's autocast, else the inputs' dtype.

    ``max_batch``: None (default) checks every call's input at once (one host read, so every
    rank raises the same :class:`~partialfc.errors.InputError` before any collective could
    hang) and gathers the rows at their sizes. A bound on the rows any rank passes makes the
    call wait for nothing: every rank's rows are padded to it and gathered with their labels
    in one collective (padding rows are left out of the mean), and the check is deferred to
    :meth:`check_inputs` (or a caller's own read: :meth:`take_input_statuses`, as the
    trainer does). Until then a bad input gives a meaningless loss, never an out-of-range
    index. Every rank must pass embeddings of one dtype. At rate < 1 the sample's size is
    static too (:meth:`CentreSampler.sample_bounded`): where ``world * max_batch`` exceeds
    ``rate * num_local`` it is padded with columns that take no part, and the row optimizer's
    step must be told the rows that did (``step(live_rows=head.take_live_rows())``). A loss
    module that is not a :class:`~partialfc.losses.base.MarginLoss` gets the unpadded sample
    (its size read from the device), since it might not leave ``targets.columns`` out.
    """

    def __init__(self, embedding_size: int, num_classes: int, loss: nn.Module | None = None,
                 sample_rate: float | None = None, process_group=None, seed: int = 0,
                 init_std: float = 0.01, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32,
                 fused: bool | str | Implementation = Implementation.auto,
                 fused_chunk: int = DEFAULT_CHUNK, nonfinite: str = "raise",
                 compute_dtype: torch.dtype | None = None, max_batch: int | None = None):
        super().__init__()
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be None or >= 1 row per rank, got {max_batch}")
        self.max_batch = max_batch
        self._pending: list[torch.Tensor] = []  # bounded: statuses not yet checked
        if compute_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"compute_dtype must be None, torch.bfloat16 or torch.float16, got {compute_dtype}")
        self.compute_dtype = compute_dtype
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE)}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.group = process_group
        self.rank = pdist.get_rank(process_group)
        self.world_size = pdist.get_world_size(process_group)
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.class_start, self.num_local = shard_range(self.num_classes, self.world_size, self.rank)
        self.loss = loss if loss is not None else CosFace()
        sample_rate = resolve_sample_rate(sample_rate, getattr(self.loss, "sample_rate", None))
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.weight = nn.Parameter(init_centres(self.class_start, self.num_local, self.embedding_size,
                                                init_std, seed, dtype, device))
        self.sampler = CentreSampler(self.num_local, sample_rate, seed, self.rank, device)
        self.fused = resolve_fused(fused, self.loss)
        self.fused_chunk = int(fused_chunk)
        if self.fused_chunk < 1:
            raise ValueError(f"fused_chunk must be >= 1 centre, got {fused_chunk}")
        self._last_sample: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)  # index, live columns
        self._live_rows: torch.Tensor | None = None  # (num_local,) bool: rows live since the last take

    @property
    def sample_rate(self) -> float:
        return self.sampler.sample_rate

    def _check_and_gather(self, embeddings: torch.Tensor, labels: torch.Tensor):
        """Eager: every rank's status gathered and read once, the same error raised on every
        rank, then the rows gathered at their sizes. Returns (embeddings, labels, finite)."""
        statuses = gather_sizes(local_status(embeddings, labels, self.weight.device), self.group)
        self._raise_if_bad(statuses)
        sizes = [s[1] for s in statuses]
        labels = gather_rows(labels.to(device=self.weight.device, dtype=torch.int64), sizes, self.group)
        if any(s[8] for s in statuses) and not embeddings.requires_grad:
            # every rank must take part in the backward's collective, even one whose input
            # needs no gradient (e.g. an empty batch built without autograd)
            embeddings = embeddings.detach().requires_grad_(True)
        return gather_rows(embeddings, sizes, self.group), labels, all_finite(statuses)

    def _gather_bounded(self, embeddings: torch.Tensor, labels: torch.Tensor):
        """Bounded (``max_batch``): no host read. Every rank's rows padded to ``max_batch``
        with label ``-1``, the labels carried as extra columns, in one gather; the statuses
        gathered on the device for :meth:`check_inputs`. A rank whose input is malformed (or
        a label out of range) sends padding rows in their place, so no index goes out of range
        before the check raises. Returns (embeddings (W*max_batch, D), labels (W*max_batch,))."""
        device, bound, width = self.weight.device, self.max_batch, self.embedding_size
        self._pending.append(torch.stack(all_gather(local_status(embeddings, labels, device), self.group)))
        if len(self._pending) >= MAX_PENDING:  # a caller that never checks still learns of an error
            self.check_inputs()
        if well_formed(embeddings, labels, width) and embeddings.shape[0] <= bound:
            embeddings, labels = embeddings.to(device), labels.to(device=device, dtype=torch.int64)
            labels = torch.where((labels >= 0) & (labels < self.num_classes), labels, -1)
        else:
            # the dtype the well-formed ranks most likely send (a gather of unequal sizes fails)
            dtype = embeddings.dtype if embeddings.is_floating_point() else (
                torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.weight.dtype)
            embeddings = torch.zeros((0, width), dtype=dtype, device=device)
            labels = torch.zeros(0, dtype=torch.int64, device=device)
        pad = bound - embeddings.shape[0]
        labels = torch.cat([labels, labels.new_full((pad,), -1)])
        block = torch.cat([F.pad(embeddings, (0, 0, 0, pad)), labels_as_columns(labels, embeddings.dtype)], dim=1)
        if torch.is_grad_enabled() and not block.requires_grad:
            block.requires_grad_(True)  # every rank takes part in the backward's collective
        block = gather_rows(block, [bound] * self.world_size, self.group)
        return block[:, :width], columns_as_labels(block[:, width:])

    def check_inputs(self) -> None:
        """Raise the :class:`~partialfc.errors.InputError` of the first bad input since the
        last check (with ``max_batch``; nothing otherwise), on every rank alike: one host read."""
        self.raise_for_inputs(self.take_input_statuses().tolist())

    def take_input_statuses(self) -> torch.Tensor:
        """The statuses gathered since the last take, ``(calls * world * STATUS_WIDTH,)`` int64
        on the head's device (empty without ``max_batch``), for a caller that reads them with
        its own values in one copy and hands them to :meth:`raise_for_inputs`."""
        pending, self._pending = self._pending, []
        if not pending:
            return torch.zeros(0, dtype=torch.int64, device=self.weight.device)
        return torch.stack(pending).reshape(-1)

    def raise_for_inputs(self, values) -> None:
        """Raise the first input error in ``values`` (the host values of
        :meth:`take_input_statuses`)."""
        per_call = self.world_size * STATUS_WIDTH
        for start in range(0, len(values), per_call):
            call = [int(v) for v in values[start: start + per_call]]
            self._raise_if_bad([call[r: r + STATUS_WIDTH] for r in range(0, per_call, STATUS_WIDTH)])

    def _raise_if_bad(self, statuses: list[list[int]]) -> None:
        """Raise the :class:`~partialfc.errors.InputError` of one call's ``statuses`` (one per
        rank, host integers), if any."""
        error = input_error(statuses, self.embedding_size, self.num_classes, self.max_batch,
                            nonfinite_raises=self.nonfinite == "raise")
        if error is not None:
            raise InputError(error)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``embeddings (B, D)`` and ``labels (B,)`` of this rank -> the global batch's mean
        loss (a scalar, the same on every rank of the group)."""
        device_type = self.weight.device.type
        if self.compute_dtype is None or torch.is_autocast_enabled(device_type):
            return self._loss(embeddings, labels)
        with torch.autocast(device_type, dtype=self.compute_dtype):
            return self._loss(embeddings, labels)

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        local_embeddings, valid = embeddings, None
        if self.max_batch is None:
            embeddings, labels, finite = self._check_and_gather(embeddings, labels)
            if not finite:  # nonfinite="report", on every rank alike: NaN, a backward to the backbone only
                return local_embeddings.float().sum() * float("nan")
        else:  # non-finite embeddings make the loss NaN by themselves
            embeddings, labels = self._gather_bounded(embeddings, labels)
            valid = labels >= 0
        every_row_local = self.world_size == 1 and valid is None
        local = labels - self.class_start
        in_shard = (local >= 0) & (local < self.num_local)
        live = None
        if self.sampler.samples_everything:
            index, centres = None, self.weight
            targets = self._targets(torch.where(in_shard, local, -1), self.num_local, every_row_local)
        else:
            if valid is None or not isinstance(self.loss, MarginLoss):  # (another module might read padding)
                index = self.sampler.sample_batch(local)
            else:  # a static size: the sample padded to the most positives the rows can hold
                index, live = self.sampler.sample_bounded(local)
            centres = F.embedding(index, self.weight, sparse=True)
            if live is not None and centres.requires_grad:  # the rows are live once a gradient reaches them
                centres.register_hook(lambda grad: self._note_live_rows(index, live))
            pos = torch.searchsorted(index, local.clamp(0, max(self.num_local - 1, 0)))
            targets = self._targets(torch.where(in_shard, pos, -1), index.shape[0], every_row_local, live)
        self._last_sample = index, live
        if not torch.is_autocast_enabled(embeddings.device.type):  # e.g. bf16 from a DeepSpeed engine
            embeddings = embeddings.to(centres.dtype)
        if self.fused is not Implementation.plain:
            return _mean(self.loss.fused(F.normalize(embeddings, dim=1), centres, targets, self.group,
                                         implementation=self.fused, chunk_size=self.fused_chunk), valid)
        cos = F.linear(F.normalize(embeddings, dim=1), F.normalize(centres, dim=1))
        with torch.no_grad():  # rounding can leave |cos| a hair above 1; the gradient passes through
            cos.clamp_(-1.0, 1.0)
        # cos stays in the matmul's dtype (bf16/fp16 under autocast): the loss upcasts the
        # target cosines and the objective builds the fp32 logits in one pass.
        return _mean(self.loss(cos, targets, self.group), valid)

    @staticmethod
    def _targets(col: torch.Tensor, width: int, every_row_local: bool, columns: torch.Tensor | None = None) -> Targets:
        """Targets of the columns ``col (B,)`` among ``width`` columns, of which ``columns``
        take part (``every_row_local``: one process owns every class and no row is padding)."""
        if every_row_local:
            return Targets(col, torch.arange(col.numel(), device=col.device), col)
        return Targets.from_columns(col, width, columns)

    def _note_live_rows(self, index: torch.Tensor, live: torch.Tensor) -> None:
        """Mark the rows ``index[live]`` of the shard live until :meth:`take_live_rows` (in
        the backward: a forward whose loss is dropped or taken without gradients marks none)."""
        if self._live_rows is None:
            self._live_rows = torch.zeros(self.num_local, dtype=torch.bool, device=index.device)
        self._live_rows.index_put_((index,), self._live_rows[index] | live)

    def take_live_rows(self) -> torch.Tensor | None:
        """The shard's rows ``(num_local,)`` bool that took part in a loss since the last take,
        for the row optimizer's ``step(live_rows=...)``; ``None`` when every row of the sparse
        gradient did. Only a bounded head whose sample is padded (``world * max_batch >
        rate * num_local``) lists rows that took no part: their gradient is 0, and they must
        not be decayed or moved by momentum as if they had been sampled."""
        live, self._live_rows = self._live_rows, None
        return live

    @property
    def last_sampled(self) -> torch.Tensor | None:
        """The sorted local indices ``(k,)`` of the centres the last call used (``None``: all);
        for inspection: a padded sample's are read from the device."""
        index, live = self._last_sample
        return index if live is None else index[live]

    def get_extra_state(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "class_start": self.class_start,
                "num_local": self.num_local, "num_classes": self.num_classes}

    def set_extra_state(self, state: dict) -> None:
        if (state["class_start"], state["num_local"]) != (self.class_start, self.num_local):
            raise ValueError(f"checkpoint shard covers classes [{state['class_start']}, "
                             f"{state['class_start'] + state['num_local']}), this rank owns "
                             f"[{self.class_start}, {self.class_start + self.num_local}); "
                             "reshard the checkpoint first")
        self.sampler.load_state_dict(state["sampler"])

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"class_start={self.class_start}, num_local={self.num_local}, "
                f"sample_rate={self.sample_rate}, world_size={self.world_size}, fused={self.fused}")
