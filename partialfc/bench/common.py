"""What ``partialfc bench head`` and ``partialfc bench train`` share: the configurations of
their methods, the heads they build (with the one full-softmax reference), per-rank set-up,
autocast and peak memory.

A configuration is a dict with at least ``method``, ``classes``, ``rate``, ``world_size``,
``batch``, ``dim``, ``device``, ``dtype``, ``steps`` and ``threads`` (CPU cores of the run).
"""

from __future__ import annotations

import os
import resource

import torch
import torch.nn.functional as F

from partialfc.ops.collectives import all_reduce
from partialfc.ops.implementation import Implementation

SCALE, MARGIN = 64.0, 0.4
# the sharded CosFace head at the configured rates: method -> (PartialFC's fused, centre storage dtype)
PARTIALFC_VARIANTS = {"partialfc": (Implementation.auto, torch.float32),
                      "partialfc_unfused": (Implementation.plain, torch.float32),
                      "partialfc_bf16": (Implementation.auto, torch.bfloat16),
                      "partialfc_unfused_bf16": (Implementation.plain, torch.bfloat16),
                      "partialfc_triton": (Implementation.triton, torch.float32)}
DEFAULT_VARIANT = (Implementation.auto, torch.float32)  # the sharded D-Softmax heads


def _numbers(text: str, cast):
    return [cast(float(v)) for v in str(text).split(",") if v]


def configs(args) -> list[dict]:
    """One configuration per world size x class count x method (x rate for ``partialfc``)
    from the parsed options ``nproc``, ``classes``, ``methods``, ``sample_rate``,
    ``no_reference``, ``batch``, ``dim``, ``device``, ``dtype``, ``steps``."""
    base = dict(batch=args.batch, dim=args.dim, device=args.device, dtype=args.dtype, steps=args.steps,
                threads=len(os.sched_getaffinity(0)))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.no_reference:
        methods = [m for m in methods if m != "full_softmax"]
    for m in methods:
        if m not in ("full_softmax", *PARTIALFC_VARIANTS, "dsoftmax_b") and not (
                m.startswith("dsoftmax_k") and m[len("dsoftmax_k"):].isdigit()):
            raise ValueError(f"unknown method {m!r}: use full_softmax, {', '.join(PARTIALFC_VARIANTS)}, "
                             "dsoftmax_b, dsoftmax_kK")
    out = []
    for world in _numbers(args.nproc, int):
        for classes in _numbers(args.classes, int):
            for method in methods:
                rates = _numbers(args.sample_rate, float) if method in PARTIALFC_VARIANTS else [None]
                out += [dict(base, method=method, classes=classes, rate=r, world_size=world) for r in rates]
    return out


def method_label(record: dict) -> str:
    """The method of a record as tables and plots name it (``partialfc rate 0.1``)."""
    if record["method"] in PARTIALFC_VARIANTS:
        return f"{record['method']} rate {record['sample_rate']:g}"
    return record["method"]


def setup(rank: int, world_size: int, cfg: dict):
    """Device, threads and peak-memory baseline of one rank; returns ``(device, baseline RSS
    in KB, x (b, dim) random embeddings, y (b,) random labels)``, ``b`` = this rank's share of
    ``cfg["batch"]``."""
    device = torch.device(f"cuda:{rank}" if cfg["device"] == "cuda" else "cpu")
    torch.set_num_threads(max(1, cfg["threads"] // world_size))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    local_batch = cfg["batch"] // world_size + (rank < cfg["batch"] % world_size)
    gen = torch.Generator(device=device).manual_seed(rank)
    x = torch.randn(local_batch, cfg["dim"], device=device, generator=gen, requires_grad=True)
    y = torch.randint(0, cfg["classes"], (local_batch,), device=device, generator=gen)
    return device, baseline, x, y


def peak_bytes(device: torch.device, baseline_rss_kb: int) -> float:
    """``torch.cuda.max_memory_allocated`` on CUDA, the growth of peak RSS on CPU."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss_kb) * 1024


def autocast(device: torch.device, dtype: str):
    """Autocast to ``"bf16"`` / ``"fp16"``; disabled for ``"fp32"``."""
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    return torch.autocast(device.type, dtype=amp, enabled=amp is not None)


def full_softmax_cosface(cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain reference: ``F.cross_entropy`` on all ``(B, C)`` logits, CosFace margin
    subtracted at the targets in place (no dense one-hot)."""
    logits = cos.float() * SCALE
    logits[torch.arange(len(labels), device=labels.device), labels] -= SCALE * MARGIN
    return F.cross_entropy(logits, labels)


class FullSoftmax(torch.nn.Module):
    """Data-parallel CosFace over all classes: ``weight (classes, D)`` replicated on every rank;
    ``forward(embeddings (b, D), labels (b,)) -> mean loss over the local batch``."""

    def __init__(self, dim: int, classes: int, device: torch.device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(classes, dim, device=device).normal_(0.0, 0.01))
        self.sample_rate = 1.0

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return full_softmax_cosface(F.linear(F.normalize(embeddings), F.normalize(self.weight)), labels)


def _sharded_loss(method: str):
    """The sharded head's loss of ``method`` and whether the head takes the configured rate."""
    from partialfc.losses import CosFace, DSoftmax

    if method == "dsoftmax_b":
        return DSoftmax(SCALE, variant="B"), False
    if method.startswith("dsoftmax_k"):
        return DSoftmax(SCALE, variant="K", K=int(method[len("dsoftmax_k"):])), False
    return CosFace(SCALE, MARGIN), True


def build_head(cfg: dict, device: torch.device, max_batch: int | None = None):
    """``(head, head optimizer, replicated head parameters)`` of ``cfg["method"]``: the
    :class:`FullSoftmax` reference with ``torch.optim.SGD`` (its weight replicated, to be
    averaged over ranks), or the sharded head with ``SparseRowSGD`` (nothing replicated;
    bounded by ``max_batch`` rows per rank when given, as the trainer's). Either draws its
    centres on ``device``."""
    from partialfc import PartialFC, SparseRowSGD

    if cfg["method"] == "full_softmax":
        head = FullSoftmax(cfg["dim"], cfg["classes"], device)
        return head, torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), [head.weight]
    loss, takes_rate = _sharded_loss(cfg["method"])
    fused, storage = PARTIALFC_VARIANTS.get(cfg["method"], DEFAULT_VARIANT)
    head = PartialFC(cfg["dim"], cfg["classes"], loss=loss, device=device,
                     sample_rate=cfg["rate"] if takes_rate else None, fused=fused, dtype=storage, max_batch=max_batch)
    return head, SparseRowSGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4), []


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Mean of the gradients of ``params`` over all ranks, in one all-reduce of a flat buffer
    (the tensor itself when there is one); parameters without a gradient (unused on every
    rank) are skipped."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = grads[0] if len(grads) == 1 else torch.cat([g.reshape(-1) for g in grads])
    all_reduce(flat)
    flat /= world_size
    if len(grads) > 1:
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
