"""The sharded Partial FC classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from partialfc import dist as pdist
from partialfc.errors import InputError
from partialfc.head.sampler import CentreSampler
from partialfc.head.sharding import shard_range
from partialfc.losses import CosFace
from partialfc.losses.base import MarginLoss
from partialfc.ops.fused import DEFAULT_CHUNK
from partialfc.ops.collectives import gather_rows, gather_sizes
from partialfc.ops.implementation import Implementation
from partialfc.ops.targets import Targets
from partialfc.seeding import Stream, seeded_generator

INIT_BLOCK = 65536  # classes per independently seeded init block
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def _local_values(embeddings: torch.Tensor, labels: torch.Tensor, labels_int: bool,
                  device: torch.device) -> torch.Tensor:
    """``[min label, max label, all embeddings finite]`` (int64 on ``device``) of one rank's
    batch, computed without leaving the device; zeros where the shapes or dtypes are wrong or
    the batch is empty (those are reported from the shape fields first)."""
    if not (labels_int and labels.dim() == 1 and embeddings.dim() == 2 and embeddings.is_floating_point()
            and labels.shape[0] == embeddings.shape[0] > 0):
        return torch.zeros(3, dtype=torch.int64, device=device)
    values = [labels.min(), labels.max(), torch.isfinite(embeddings).all()]
    return torch.stack([v.to(device=device, dtype=torch.int64) for v in values])


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
    """

    def __init__(self, embedding_size: int, num_classes: int, loss: nn.Module | None = None,
                 sample_rate: float | None = None, process_group=None, seed: int = 0,
                 init_std: float = 0.01, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32,
                 fused: bool | str | Implementation = Implementation.auto,
                 fused_chunk: int = DEFAULT_CHUNK, nonfinite: str = "raise",
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
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
        self.last_sampled: torch.Tensor | None = None  # local indices used by the last step

    @property
    def sample_rate(self) -> float:
        return self.sampler.sample_rate

    def _check_and_gather(self, embeddings: torch.Tensor, labels: torch.Tensor):
        """Validate every rank's input, raising the same error on all ranks, then gather."""
        dims = embeddings.dim(), labels.dim()
        labels_int = not labels.is_floating_point() and not labels.is_complex() and labels.dtype != torch.bool
        shape = torch.tensor([dims[0], embeddings.shape[0] if dims[0] else 0,
                              embeddings.shape[-1] if dims[0] else 0, int(embeddings.is_floating_point()),
                              int(labels_int), dims[1], labels.shape[0] if dims[1] else 0,
                              FLOAT_DTYPES.index(embeddings.dtype) if embeddings.dtype in FLOAT_DTYPES else -1,
                              int(embeddings.requires_grad)], dtype=torch.int64)
        # The values (label range, finiteness) travel in the same vector: one gather, one host
        # synchronisation for the whole validation. A pageable host->device copy with
        # non_blocking=True is safe (CUDA stages the source before returning) and does not sync.
        status = torch.cat([shape.to(self.weight.device, non_blocking=True),
                            _local_values(embeddings, labels, labels_int, self.weight.device)])
        statuses = gather_sizes(status, self.group)
        dtypes = {s[7] for s in statuses}
        if len(dtypes) > 1:
            raise InputError("embeddings have different dtypes on different ranks: "
                             + ", ".join(f"rank {r}: {FLOAT_DTYPES[s[7]] if s[7] >= 0 else 'not float'}"
                                         for r, s in enumerate(statuses)))
        for r, (emb_dim, b, width, emb_float, lab_int, lab_dim, lab_n) in enumerate(s[:7] for s in statuses):
            where = f" on rank {r}" if self.world_size > 1 else ""
            if emb_dim != 2 or width != self.embedding_size:
                raise InputError(f"embeddings{where} must have shape (batch, {self.embedding_size}), "
                                 f"got {emb_dim} dims of width {width}")
            if not emb_float:
                raise InputError(f"embeddings{where} must be floating point")
            if not lab_int:
                raise InputError(f"labels{where} must be an integer tensor (e.g. torch.int64), "
                                 "got a floating-point, complex or bool tensor")
            if lab_dim != 1 or lab_n != b:
                raise InputError(f"labels{where} must have shape ({b},) to match the embeddings, "
                                 f"got {lab_dim} dims of length {lab_n}")
        sizes = [s[1] for s in statuses]
        labels = gather_rows(labels.to(device=self.weight.device, dtype=torch.int64), sizes, self.group)
        if any(s[8] for s in statuses) and not embeddings.requires_grad:
            # every rank must take part in the backward's collective, even one whose input
            # needs no gradient (e.g. an empty batch built without autograd)
            embeddings = embeddings.detach().requires_grad_(True)
        embeddings = gather_rows(embeddings, sizes, self.group)
        if labels.numel() == 0:
            raise InputError("the global batch is empty")
        lo = min(s[9] for s in statuses if s[1])
        hi = max(s[10] for s in statuses if s[1])
        finite = all(s[11] for s in statuses if s[1])
        if lo < 0 or hi >= self.num_classes:
            bad = lo if lo < 0 else hi
            raise InputError(f"label {bad} outside [0, {self.num_classes}) (num_classes={self.num_classes})")
        if not finite and self.nonfinite == "raise":
            raise InputError("embeddings contain NaN or inf")
        return embeddings, labels, finite

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``embeddings (B, D)`` and ``labels (B,)`` of this rank -> the global batch's mean
        loss (a scalar, the same on every rank of the group)."""
        device_type = self.weight.device.type
        if self.compute_dtype is None or torch.is_autocast_enabled(device_type):
            return self._loss(embeddings, labels)
        with torch.autocast(device_type, dtype=self.compute_dtype):
            return self._loss(embeddings, labels)

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        local_embeddings = embeddings
        embeddings, labels, finite = self._check_and_gather(embeddings, labels)
        if not finite:  # nonfinite="report", on every rank alike: NaN, a backward to the backbone only
            return local_embeddings.float().sum() * float("nan")
        local = labels - self.class_start
        in_shard = (local >= 0) & (local < self.num_local)
        if self.sampler.samples_everything:
            index, centres = None, self.weight
            targets = self._targets(torch.where(in_shard, local, -1), self.num_local)
        else:
            index = self.sampler.sample_batch(local)
            centres = F.embedding(index, self.weight, sparse=True)
            pos = torch.searchsorted(index, local.clamp(0, max(self.num_local - 1, 0)))
            targets = self._targets(torch.where(in_shard, pos, -1), index.shape[0])
        self.last_sampled = index
        if not torch.is_autocast_enabled(embeddings.device.type):  # e.g. bf16 from a DeepSpeed engine
            embeddings = embeddings.to(centres.dtype)
        if self.fused is not Implementation.plain:
            return self.loss.fused(F.normalize(embeddings, dim=1), centres, targets, self.group,
                                   implementation=self.fused, chunk_size=self.fused_chunk).mean()
        cos = F.linear(F.normalize(embeddings, dim=1), F.normalize(centres, dim=1))
        with torch.no_grad():  # rounding can leave |cos| a hair above 1; the gradient passes through
            cos.clamp_(-1.0, 1.0)
        # cos stays in the matmul's dtype (bf16/fp16 under autocast): the loss upcasts the
        # target cosines and the objective builds the fp32 logits in one pass.
        return self.loss(cos, targets, self.group).mean()

    def _targets(self, col: torch.Tensor, width: int) -> Targets:
        """Targets of the columns ``col (B,)`` among ``width`` columns; one process owns every
        class, so every row's target is local."""
        if self.world_size == 1:
            return Targets(col, torch.arange(col.numel(), device=col.device), col)
        return Targets.from_columns(col, width)

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
