"""Optimizers that touch only the rows a step sampled.

With ``sample_rate < 1`` the head's ``weight.grad`` is a sparse COO tensor whose indices are
the sampled rows. These optimizers update exactly those rows: parameter, momentum / Adam
moments and weight decay of every other row stay bit-identical, and no dense gradient of
the shard is ever formed. A dense gradient (``sample_rate == 1``) updates every row and then
matches ``torch.optim.SGD`` / ``torch.optim.AdamW`` step for step.

Memory: the rows are stepped ``block_rows`` (default 65536) at a time, so the step's working
copies are bounded by a block, whatever the number of sampled rows; the result is bit-identical
to stepping all rows at once. The head's sparse gradient (unique, sorted rows) is read as it
stands, without the copy ``coalesce()`` would make.

Compact storage: for a bf16 parameter the state is kept in bf16 as well (half the bytes
per class); each step reads the sampled rows into fp32, does the arithmetic there and
writes back with unbiased stochastic rounding, so that updates far below bf16's resolution
still move the rows on average. The rounding noise comes from the ``seed``, the step count
and the tensor written (:class:`partialfc.seeding.Stream` ``ROUNDING``), so runs and resumes
repeat.
"""

from __future__ import annotations

import torch

from partialfc.seeding import Stream, seeded_generator


BLOCK_ROWS = 65536  # rows stepped at a time: bounds the step's fp32 working set


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 ``x`` rounded to bf16 up or down at random, ``E[result] = x``: add 16 uniform
    random bits below bf16's last mantissa bit, then truncate (on the magnitude, so both
    signs are unbiased)."""
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    return (bits + noise).bitwise_and_(-(1 << 16)).view(torch.float32).to(torch.bfloat16)


def sparse_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows (n,), values (n, ...))`` of a sparse row gradient, each row once, ascending.
    The head's gradient (an embedding lookup of unique sorted rows) already is, and is used
    as it stands; only one with repeated or unsorted rows (e.g. accumulated over several
    backwards) is coalesced, which copies the values."""
    if not grad.is_coalesced():
        rows = grad._indices()[0]
        if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
            grad = grad.coalesce()
    return grad._indices()[0], grad._values()


def mark_head_gradient(param: torch.Tensor, backwards: int, live_rows: torch.Tensor | None = None) -> torch.Tensor | None:
    """Make the head's sparse gradient (rate < 1) a coalesced tensor, so that its norm, the
    clipping and the row optimizer do not coalesce it (a host synchronisation each), and
    return the ``live_rows`` for the step. After one backward its rows are the sampler's
    index, sorted and unique: marked as they are (autograd does not keep the mark, so the
    caller sets it). Summed over ``backwards > 1``: combined by :func:`combine_rows`, whose
    filler rows the step must leave alone. ``live_rows``: the head's
    (:meth:`~partialfc.head.PartialFC.take_live_rows`, rows of the gradient, so within the
    present ones), returned as they are when given. A dense or already coalesced gradient, or
    none, is left alone."""
    grad = param.grad
    if grad is None or not grad.is_sparse or grad.is_coalesced():
        return live_rows
    if backwards > 1:
        param.grad, present = combine_rows(grad)
        return present if live_rows is None else live_rows
    param.grad = torch.sparse_coo_tensor(grad._indices(), grad._values(), grad.shape, is_coalesced=True,
                                         check_invariants=False)
    return live_rows


def combine_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``coalesce()`` of a sparse row gradient ``(num_rows, ...)`` with ``nnz`` entries
    (repeated rows summed) at a size fixed by ``nnz`` alone, so without a host
    synchronisation: ``min(nnz, num_rows)`` sorted distinct rows, the present ones holding
    their sums and the rest filler rows (the first absent ones, zeros). Returns the gradient,
    marked coalesced, and ``present (num_rows,)`` bool: the rows whose step is real. The sums
    go through ``index_put_(accumulate=True)``, deterministic on CUDA too."""
    rows, values = grad._indices()[0], grad._values()
    num_rows, size = grad.shape[0], min(rows.numel(), grad.shape[0])
    present = torch.zeros(num_rows, dtype=torch.bool, device=rows.device).index_fill_(0, rows, True)
    # the present rows, then the absent ones, each ascending: the first ``size`` of them, sorted
    kept = torch.sort(torch.argsort(present.to(torch.uint8), descending=True, stable=True)[:size]).values
    slot = torch.empty(num_rows, dtype=rows.dtype, device=rows.device)
    slot[kept] = torch.arange(size, device=rows.device)
    sums = values.new_zeros((size, *values.shape[1:])).index_put_((slot[rows],), values, accumulate=True)
    combined = torch.sparse_coo_tensor(kept[None], sums, grad.shape, is_coalesced=True, check_invariants=False)
    return combined, present


class _Rows:
    """The rows one step of one parameter updates: the sampled rows of a sparse gradient, or
    all rows of a dense one. :meth:`blocks` walks them ``block_rows`` at a time, so the
    working copies (fp32 for half-precision storage) are a block's, not the whole sample's.

    For bf16 storage every tensor written gets its own rounding noise stream, seeded by
    ``(seed, Stream.ROUNDING, param index, step, tensor)`` and drawn block after block, so
    the result does not depend on the block size (on CPU; a CUDA generator may draw
    differently when split)."""

    def __init__(self, param: torch.Tensor, state: dict, seed: int, index: int, block_rows: int,
                 live_rows: torch.Tensor | None = None):
        self.work = torch.promote_types(param.dtype, torch.float32)
        grad = param.grad
        self.rows, self.values = sparse_rows(grad) if grad.is_sparse else (None, grad)
        # per gradient row: whether it is written (None: all are)
        self.live = None if live_rows is None or self.rows is None else live_rows[self.rows]
        self.block_rows = block_rows
        self.rounding: dict[int, torch.Generator] | None = None  # id(tensor) -> noise stream
        if param.dtype == torch.bfloat16:
            state["rounding_step"] = state.get("rounding_step", 0) + 1
            self.rounding, self.keys = {}, (seed, Stream.ROUNDING, index, state["rounding_step"])

    def blocks(self):
        n = self.values.shape[0]
        for lo in range(0, n, self.block_rows):
            yield _Block(self, lo, min(lo + self.block_rows, n))

    def noise(self, t: torch.Tensor) -> torch.Generator:
        if id(t) not in self.rounding:
            self.rounding[id(t)] = seeded_generator(*self.keys, len(self.rounding), device=t.device)
        return self.rounding[id(t)]


class _Block:
    """Rows ``[lo, hi)`` of a :class:`_Rows`: ``grad`` in the working dtype; :meth:`take`
    reads those rows of the parameter or a state tensor, :meth:`put` writes them back."""

    def __init__(self, rows: _Rows, lo: int, hi: int):
        self.owner, self.lo, self.hi = rows, lo, hi
        self.index = None if rows.rows is None else rows.rows[lo:hi]
        self.live = None if rows.live is None else rows.live[lo:hi]
        self.grad = rows.values[lo:hi].to(rows.work)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The block's rows of ``t`` in the working dtype (fp64 kept); at rate 1 with an fp32
        ``t`` a view of ``t`` itself."""
        rows = t[self.lo:self.hi] if self.index is None else t.index_select(0, self.index)
        return rows.to(torch.promote_types(t.dtype, self.owner.work))

    def put(self, t: torch.Tensor, value: torch.Tensor) -> None:
        if self.owner.rounding is not None and t.dtype == torch.bfloat16:
            value = stochastic_round_bf16(value, self.owner.noise(t))
        if self.index is None:
            t[self.lo:self.hi].copy_(value)
            return
        value = value.to(t.dtype)
        if self.live is not None:  # rows that took no part keep every bit
            value = torch.where(self.live.view(-1, *(1,) * (value.dim() - 1)), value, t.index_select(0, self.index))
        t.index_copy_(0, self.index, value)


def _run_closure(closure):
    """The optimizer-closure convention: re-evaluate the loss with gradients enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _check_block_rows(block_rows: int) -> int:
    if int(block_rows) < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    return int(block_rows)


class RowOptimizer(torch.optim.Optimizer):
    """Base of the row optimizers of one parameter (the head's shard ``(num_rows, D)``): its
    state splits into per-row tensors (:attr:`row_keys`, row ``i`` belonging to row ``i`` of the
    parameter, so they shard and reshard with it) and the rest (param groups, counters).
    :meth:`state_dict` holds the rest only; :meth:`row_state` the per-row tensors."""

    row_keys: tuple[str, ...] = ()

    def _param(self) -> torch.Tensor:
        params = [p for group in self.param_groups for p in group["params"]]
        if len(params) != 1:
            raise ValueError(f"{type(self).__name__} keeps row state for one parameter, it has {len(params)}")
        return params[0]

    def row_state(self) -> dict[str, torch.Tensor]:
        """``{name: (num_rows, ...)}``: the parameter's per-row state ({} before its first step)."""
        state = self.state.get(self._param(), {})
        return {k: state[k] for k in self.row_keys if k in state}

    def load_row_state(self, rows: dict[str, torch.Tensor]) -> None:
        """Set the per-row state to copies of :meth:`row_state`'s tensors, on the parameter's device."""
        param = self._param()
        self.state[param].update({k: v.to(param.device, copy=True) for k, v in rows.items()})

    def state_dict(self) -> dict:
        """``torch.optim.Optimizer.state_dict`` without the per-row tensors."""
        full = super().state_dict()
        return {**full, "state": {i: {k: v for k, v in s.items() if k not in self.row_keys}
                                  for i, s in full["state"].items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict`; the per-row state stays as it is."""
        rows = self.row_state()
        super().load_state_dict(state_dict)
        self.load_row_state(rows)


class SparseRowSGD(RowOptimizer):
    """SGD with momentum, Nesterov and L2 weight decay (``torch.optim.SGD`` semantics,
    dampening 0) applied to the sampled rows only, ``block_rows`` rows at a time."""

    row_keys = ("momentum_buffer",)

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, seed: int = 0, block_rows: int = BLOCK_ROWS):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"invalid lr={lr}, momentum={momentum} or weight_decay={weight_decay}")
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      nesterov=nesterov))
        self.seed = int(seed)  # stochastic rounding of bf16 parameters
        self.block_rows = _check_block_rows(block_rows)

    @torch.no_grad()
    def step(self, closure=None, live_rows: torch.Tensor | None = None):
        """One step of the rows of each gradient (``live_rows (num_rows,)`` bool: only those of
        them it marks; the others keep their values and state, as a bounded head's padding
        rows must: :meth:`~partialfc.head.PartialFC.take_live_rows`)."""
        loss = _run_closure(closure)
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if mu and "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                for rows in _Rows(p, state, self.seed, index, self.block_rows, live_rows).blocks():
                    p_rows, d = rows.take(p), rows.grad
                    if wd:
                        d = d.add(p_rows, alpha=wd)
                    if mu:
                        buf = rows.take(state["momentum_buffer"]).mul_(mu).add_(d)
                        rows.put(state["momentum_buffer"], buf)
                        d = d.add(buf, alpha=mu) if group["nesterov"] else buf
                    rows.put(p, p_rows.add(d, alpha=-lr))
        return loss


class SparseRowAdamW(RowOptimizer):
    """AdamW (decoupled weight decay, ``torch.optim.AdamW`` semantics) on the sampled rows,
    ``block_rows`` rows at a time.

    Each row keeps its own step count, so the bias correction of a row reflects how often
    that row was sampled; at ``sample_rate == 1`` this is the usual global step."""

    row_keys = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, seed: int = 0, block_rows: int = BLOCK_ROWS):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.seed = int(seed)  # stochastic rounding of bf16 parameters
        self.block_rows = _check_block_rows(block_rows)

    @torch.no_grad()
    def step(self, closure=None, live_rows: torch.Tensor | None = None):
        """One step of the rows of each gradient (``live_rows (num_rows,)`` bool: only those of
        them it marks; the others keep their values and state, as a bounded head's padding
        rows must: :meth:`~partialfc.head.PartialFC.take_live_rows`)."""
        loss = _run_closure(closure)
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.zeros(p.shape[0], dtype=torch.float64, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                for rows in _Rows(p, state, self.seed, index, self.block_rows, live_rows).blocks():
                    g = rows.grad
                    p_rows = rows.take(p).mul_(1 - lr * wd)
                    m = rows.take(state["exp_avg"]).lerp_(g, 1 - b1)
                    v = rows.take(state["exp_avg_sq"]).mul_(b2).addcmul_(g, g, value=1 - b2)
                    step = rows.take(state["step"]) + 1
                    shape = (-1,) + (1,) * (p.dim() - 1)
                    bias1 = (1 - b1 ** step).to(rows.owner.work).view(shape)
                    bias2_sqrt = (1 - b2 ** step).sqrt().to(rows.owner.work).view(shape)
                    p_rows.sub_(lr * m / bias1 / (v.sqrt() / bias2_sqrt + eps))
                    for name, value in (("exp_avg", m), ("exp_avg_sq", v), ("step", step)):
                        rows.put(state[name], value)
                    rows.put(p, p_rows)
        return loss
