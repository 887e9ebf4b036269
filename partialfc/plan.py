"""Will it fit? Per-rank memory of a Partial FC run, before spending an allocation.

The class state uses the benchmarks' accounting (:func:`partialfc.bench.capacity.analytic_bytes_per_class`,
:data:`~partialfc.bench.capacity.STATE_ROWS` rows per class for SGD with momentum); AdamW keeps one
row more (``exp_avg`` and ``exp_avg_sq``, :class:`~partialfc.head.optim.SparseRowAdamW`), all
at the storage dtype (bf16 storage keeps bf16 state, rounded stochastically).

The step's working set is the default head path, ``fused="torch"`` (a MarginLoss picks it),
which walks the sampled centres in chunks and never holds the ``B_global x k`` logits:
the larger of forward + backward (per sampled element of ``k x D``, ``k = max(floor(rate *
num_local), positives)``: the gathered rows, their fp32 gradient and the sparse gradient, a
per-element constant measured here, :data:`FORWARD_BACKWARD`; plus three fp32 ``B_global x
chunk`` blocks, the all-gathered embeddings ``B_global x D`` at the compute dtype with their
fp32 gradient, and the sampler's keys, 5 bytes per local class) and the optimizer step (the
gradient plus its working copies of one block of rows, :data:`OPTIMIZER_STEP`).
``B_global = batch x world``: the embeddings are all-gathered. The plain path (``path="plain"``)
holds the ``B_global x k`` cosines, fp32 logits and their gradient instead of the chunks.

The backbone: parameters + gradients + SGD momentum, fp32, counted on the meta device; and
the activations, measured: the live tensor bytes (TensorBytes) after a CPU forward at 112 x 112
under bf16 autocast at batch 2 and at batch 4, a line through the two (its intercept: the
autocast cache of bf16 weights) taken at the batch (:func:`activation_bytes`; a few seconds
for iresnet100, so the iresnets' are stored in :data:`ACTIVATIONS_MB`; ``activation_gb``
replaces it). Training at fp32 precision, or with gradient checkpointing, differs.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch

from partialfc.bench.capacity import STATE_ROWS, analytic_bytes_per_class
from partialfc.errors import InputError
from partialfc.head.optim import BLOCK_ROWS
from partialfc.ops.fused import DEFAULT_CHUNK

if TYPE_CHECKING:
    from partialfc.train.config_schema import Config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = {"fp32": "partialfc", "bf16": "partialfc_bf16"}  # the bench's method names, same storage
OPTIMIZER_ROWS = {"sgd": STATE_ROWS - 1, "adamw": STATE_ROWS}  # rows of optimizer state per class
GB = 1e9
# Bytes per sampled element (k x D) a step holds on top of the class state, measured here with
# TensorBytes on CPU (tests/test_plan.py re-measures them): forward + backward (the gathered
# rows, their fp32 gradient, the sparse gradient built from it; the chunk blocks and the
# embeddings are counted apart), by whether the head samples;
# the optimizer step beyond the gradient (its fp32 working copies of a block of rows; bf16
# storage adds the rounding noise), by (samples, storage).
FORWARD_BACKWARD = {True: 12, False: 6}
OPTIMIZER_STEP = {(True, "fp32"): 12, (True, "bf16"): 26, (False, "fp32"): 4, (False, "bf16"): 26}



def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def check_inputs(identities: int, world: int, rates, dtypes, optimizer: str, batch: int, dim: int) -> None:
    if identities < 1:
        raise InputError(f"identities must be >= 1, got {identities}")
    if world < 1:
        raise InputError(f"the world size (GPUs per node x nodes) must be >= 1, got {world}")
    if batch < 1 or dim < 1:
        raise InputError(f"batch and embedding dim must be >= 1, got {batch} and {dim}")
    for r in rates:
        if not 0 < r <= 1:
            raise InputError(f"sample rate {r} outside (0, 1]")
    for d in dtypes:
        if d not in DTYPES:
            raise InputError(f"storage dtype {d!r} is not one of {', '.join(DTYPES)}")
    if optimizer not in OPTIMIZER_ROWS:
        raise InputError(f"head optimizer {optimizer!r} is not one of {', '.join(OPTIMIZER_ROWS)}")


def head_bytes(identities: int, world: int, dim: int, batch: int, rate: float, storage: str = "fp32",
               optimizer: str = "sgd", compute: str = "bf16", path: str = "torch",
               chunk: int = DEFAULT_CHUNK) -> dict:
    """Per-rank bytes of the head: ``centres``, ``optimizer``, ``working`` (one step's peak on top)."""
    num_local = math.ceil(identities / world)
    per_class = analytic_bytes_per_class(dict(method=METHODS[storage], dim=dim, world_size=1))  # centre + momentum
    row = per_class / STATE_ROWS
    b_global = batch * world
    k = min(num_local, max(math.floor(rate * num_local + 1e-9), min(b_global, num_local)))
    s, c = _itemsize(storage), _itemsize(compute)
    sampled = k < num_local  # rate 1 uses the weight itself, its gradient dense
    emb = b_global * dim * (c + 4)
    blocks = 3 * b_global * min(chunk, k) * 4 if path == "torch" else b_global * k * (c + 4 + 4)
    forward_backward = k * dim * FORWARD_BACKWARD[sampled] + emb + blocks + (5 * num_local if sampled else 0)
    step = k * dim * s + min(k, BLOCK_ROWS) * dim * OPTIMIZER_STEP[sampled, storage]
    return dict(num_local=num_local, k=k, centres=num_local * row, optimizer=OPTIMIZER_ROWS[optimizer] * num_local * row,
                working=max(forward_backward, step))


def backbone_bytes(name: str, dim: int = 512) -> tuple[int, float]:
    """(parameters, bytes of parameters + gradients + SGD momentum in fp32)."""
    from partialfc.models import build_backbone

    with torch.device("meta"):
        model = build_backbone(name, embedding_size=dim)
    n = sum(p.numel() for p in model.parameters())
    return n, 3 * 4 * n


# activation_fit's (fixed MB, MB per sample), measured here (torch 2.13 CPU), so the common
# backbones cost no forward; other backbones are measured when asked.
ACTIVATIONS_MB = {"iresnet100": (130.45, 55.87), "iresnet50": (87.3, 35.4), "iresnet18": (48.1, 23.0)}


@functools.lru_cache(maxsize=None)
def activation_fit(name: str, dim: int = 512) -> tuple[float, float]:
    """(fixed bytes, bytes per sample) of the backbone's forward, see the module docstring."""
    from partialfc.bench.capacity import TensorBytes
    from partialfc.models import build_backbone

    model = build_backbone(name, embedding_size=dim)
    live = []
    for n in (2, 4):
        x, acct = torch.randn(n, 3, 112, 112), TensorBytes()
        with acct, torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            live.append(acct.current)
        del out
    per_sample = (live[1] - live[0]) / 2
    return live[0] - 2 * per_sample, per_sample


def activation_bytes(name: str, batch: int, dim: int = 512) -> float:
    if name in ACTIVATIONS_MB and dim == 512:
        fixed, per_sample = (v * 1e6 for v in ACTIVATIONS_MB[name])
    else:
        fixed, per_sample = activation_fit(name, dim)
    return fixed + per_sample * batch


def max_identities(world: int, budget: float, fixed: float, **kw) -> int:
    """The largest identity count whose head fits ``budget - fixed`` bytes per rank (bisection)."""
    def fits(n):
        h = head_bytes(n, world, **kw)
        return fixed + h["centres"] + h["optimizer"] + h["working"] <= budget
    lo, hi = 0, world
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 10**13:
            return lo
    while hi - lo > max(1, lo // 10**4):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def plan(identities: int, gpus_per_node: int, nodes: int, gpu_memory_gb: float, backbone: str = "iresnet100",
         batch: int = 128, rates=(0.1,), dtypes=("fp32",), dim: int = 512, optimizer: str = "sgd",
         headroom: float = 0.10, activation_gb: float | None = None, measured: dict | None = None) -> dict:
    """One row per (rate, dtype): per-rank GB, whether it fits, the largest identity count that fits;
    ``recommended``: the smallest rate >= 0.1 that fits (fp32 before bf16), else None."""
    world = gpus_per_node * nodes
    check_inputs(identities, world, rates, dtypes, optimizer, batch, dim)
    params, bb = backbone_bytes(backbone, dim)
    budget = gpu_memory_gb * GB * (1 - headroom)
    acts = activation_bytes(backbone, batch, dim) if activation_gb is None else activation_gb * GB
    fixed = bb + acts
    rows = []
    for dtype in dtypes:
        for rate in rates:
            h = head_bytes(identities, world, dim, batch, rate, dtype, optimizer)
            total = fixed + h["centres"] + h["optimizer"] + h["working"]
            row = dict(rate=rate, dtype=dtype, num_local=h["num_local"], k=h["k"],
                       centres_gb=h["centres"] / GB, optimizer_gb=h["optimizer"] / GB, working_gb=h["working"] / GB,
                       head_gb=(h["centres"] + h["optimizer"] + h["working"]) / GB, backbone_gb=bb / GB,
                       activations_gb=acts / GB,
                       total_gb=total / GB, fits=total <= budget,
                       max_identities=max_identities(world, budget, fixed, dim=dim, batch=batch, rate=rate,
                                                     storage=dtype, optimizer=optimizer))
            if measured and (dtype, rate) in measured:  # bytes per local class, from `partialfc bench head`
                row["measured_head_gb"] = measured[dtype, rate] * h["num_local"] / GB
            rows.append(row)
    ok = sorted((r for r in rows if r["fits"] and r["rate"] >= 0.1), key=lambda r: (r["rate"], r["dtype"] != "fp32"))
    return dict(identities=identities, world=world, gpu_memory_gb=gpu_memory_gb, headroom=headroom,
                budget_gb=budget / GB, backbone=backbone, backbone_params=params, batch=batch, dim=dim,
                optimizer=optimizer, head_path="fused torch (default for margin losses)",
                activations=("measured: live tensors after a bf16-autocast CPU forward at 112x112, a line through batch 2 and 4"
                             if activation_gb is None else "given"),
                rows=rows, recommended=ok[0] if ok else None)


def refusal(result: dict) -> str | None:
    """None if some row fits, else the one-line reason (for ``partialfc submit``)."""
    if any(r["fits"] for r in result["rows"]):
        return None
    r = min(result["rows"], key=lambda r: r["total_gb"])
    return (f"{result['identities']} identities on {result['world']} GPUs needs {r['total_gb']:.1f} GB per GPU "
            f"({r['head_gb']:.1f} GB for the head) at sample rate {r['rate']} ({r['dtype']}), the GPU has "
            f"{result['gpu_memory_gb']:g} GB ({result['budget_gb']:.1f} GB after headroom); try more GPUs, "
            f"a lower head.sample_rate or head.storage=bf16 (at most {r['max_identities']} identities fit)")


def precheck(cfg: Config, gpus_per_node: int, nodes: int, gpu_memory_gb: float) -> str | None:
    """``partialfc submit``'s check of a loaded config: :class:`LaunchError` (one line) if the
    job cannot fit; else None, or a note saying why nothing was checked. The rate is
    ``head.sample_rate`` (1 when the config leaves it to the loss: the upper bound)."""
    from partialfc.errors import LaunchError

    if not gpus_per_node:
        return None  # CPU ranks: nothing to fit
    if not cfg.data.num_classes:
        return "plan: no pre-check, the config does not set data.num_classes (see partialfc plan)"
    rate = 1.0 if cfg.head.sample_rate is None else float(cfg.head.sample_rate)
    result = plan(int(cfg.data.num_classes), gpus_per_node, nodes, gpu_memory_gb, str(cfg.model.backbone),
                  int(cfg.data.batch_size), (rate,), (str(cfg.head.storage),), int(cfg.model.embedding_size),
                  str(cfg.head.optimizer.name))
    reason = refusal(result)
    if reason:
        raise LaunchError(reason + "; or pass --no-plan")
    return None
