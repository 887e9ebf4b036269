"""``partialfc bench head``: step time and peak memory of the Partial FC head against a plain
``F.cross_entropy`` full softmax (dense class matrix, ``torch.optim.SGD``).

Each configuration runs in fresh processes (``--nproc`` ranks for Partial FC, one for the
reference) so that peak memory is its own: ``torch.cuda.max_memory_allocated`` on CUDA, the
growth of peak RSS above the process's baseline on CPU. A step = forward + backward +
optimizer step of the head alone on random embeddings (``--batch`` is the global batch).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SCALE, MARGIN = 64.0, 0.4


def _numbers(text: str, cast):
    return [cast(float(v)) for v in text.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", default="1e5,1e6", help="comma-separated class counts")
    parser.add_argument("--sample-rate", default="1.0,0.1", help="comma-separated Partial FC rates")
    parser.add_argument("--batch", type=int, default=512, help="global batch size")
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--nproc", type=int, default=1, help="ranks of the Partial FC head (gloo on CPU, NCCL on CUDA)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype of the matmul")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--no-reference", action="store_true", help="skip the full-softmax reference")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/head"), help="output directory")
    parser.add_argument("--name", default="bench_head", help="base name of the output files")


def _peak_bytes(device: torch.device, baseline_rss_kb: int) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss_kb) * 1024


def _time_steps(step, steps: int, device: torch.device) -> float:
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def _autocast(device: torch.device, dtype: str):
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    return torch.autocast(device.type, dtype=amp, enabled=amp is not None)


def _measure_partialfc(rank, world_size, cfg):
    from partialfc import PartialFC, SparseRowSGD
    from partialfc.losses import CosFace

    device = torch.device(f"cuda:{rank}" if cfg["device"] == "cuda" else "cpu")
    torch.set_num_threads(max(1, cfg["threads"] // world_size))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    local_batch = cfg["batch"] // world_size + (rank < cfg["batch"] % world_size)
    head = PartialFC(cfg["dim"], cfg["classes"], loss=CosFace(SCALE, MARGIN), sample_rate=cfg["rate"],
                     device=device)
    opt = SparseRowSGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator(device=device).manual_seed(rank)
    x = torch.randn(local_batch, cfg["dim"], device=device, generator=gen, requires_grad=True)
    y = torch.randint(0, cfg["classes"], (local_batch,), device=device, generator=gen)

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(device, cfg["dtype"]):
            loss = head(x, y)
        loss.backward()
        opt.step()

    step_s = _time_steps(step, cfg["steps"], device)
    return step_s, _peak_bytes(device, baseline)


def _measure_full_softmax(rank, world_size, cfg):
    device = torch.device("cuda:0" if cfg["device"] == "cuda" else "cpu")
    torch.set_num_threads(cfg["threads"])
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    weight = torch.nn.Parameter(torch.randn(cfg["classes"], cfg["dim"], device=device) * 0.01)
    opt = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(cfg["batch"], cfg["dim"], device=device, requires_grad=True)
    y = torch.randint(0, cfg["classes"], (cfg["batch"],), device=device)
    margin = F.one_hot(y, cfg["classes"]).to(x.dtype) * (SCALE * MARGIN)

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(device, cfg["dtype"]):
            logits = F.linear(F.normalize(x), F.normalize(weight)).float() * SCALE - margin
        F.cross_entropy(logits, y).backward()
        opt.step()

    step_s = _time_steps(step, cfg["steps"], device)
    return step_s, _peak_bytes(device, baseline)


def _configs(args) -> list[dict]:
    import os

    base = dict(batch=args.batch, dim=args.dim, device=args.device, dtype=args.dtype, steps=args.steps,
                threads=len(os.sched_getaffinity(0)))
    out = []
    for classes in _numbers(args.classes, int):
        if not args.no_reference:
            out.append(dict(base, method="full_softmax", classes=classes, rate=1.0, world_size=1))
        for rate in _numbers(args.sample_rate, float):
            out.append(dict(base, method="partialfc", classes=classes, rate=rate, world_size=args.nproc))
    return out


def _run_config(cfg) -> dict:
    from partialfc.testing import run_distributed

    fn = _measure_full_softmax if cfg["method"] == "full_softmax" else _measure_partialfc
    backend = "nccl" if cfg["device"] == "cuda" else "gloo"
    try:
        per_rank = run_distributed(fn, cfg["world_size"], cfg, backend=backend, timeout=3600)
        step_s = max(s for s, _ in per_rank)
        peak = max(m for _, m in per_rank)
        status = "ok"
    except RuntimeError as err:  # an out-of-memory config is a result, not a crash
        step_s, peak = float("nan"), float("nan")
        status = "oom" if "out of memory" in str(err).lower() else "error: " + str(err).splitlines()[-1][:200]
    return dict(method=cfg["method"], classes=cfg["classes"], sample_rate=cfg["rate"],
                world_size=cfg["world_size"], global_batch=cfg["batch"], dim=cfg["dim"], dtype=cfg["dtype"],
                device=cfg["device"], step_s=step_s, samples_per_s=cfg["batch"] / step_s,
                peak_mem_mb=peak / 2**20, status=status)


def _add_ratios(records: list[dict]) -> None:
    ref = {r["classes"]: r for r in records if r["method"] == "full_softmax" and r["status"] == "ok"}
    for r in records:
        base = ref.get(r["classes"])
        if base is not None:
            r["speedup_vs_full"] = base["step_s"] / r["step_s"]
            r["mem_ratio_vs_full"] = r["peak_mem_mb"] / base["peak_mem_mb"]


def _figure(records: list[dict], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[dict]] = {}
    for r in records:
        label = "full softmax" if r["method"] == "full_softmax" else f"Partial FC rate {r['sample_rate']:g}"
        series.setdefault(label, []).append(r)
    for label, rs in series.items():
        rs = sorted(rs, key=lambda r: r["classes"])
        xs = [r["classes"] for r in rs]
        style = "k--o" if label == "full softmax" else "-o"
        ax_t.plot(xs, [r["samples_per_s"] for r in rs], style, label=label)
        ax_m.plot(xs, [r["peak_mem_mb"] for r in rs], style, label=label)
    for ax, ylabel in ((ax_t, "samples / s (head step)"), (ax_m, "peak memory per rank (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("identities (classes)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend()
    fig.suptitle(title)
    return fig


def run(args) -> int:
    from rich.console import Console
    from rich.progress import track

    from partialfc.bench.report import hardware_label, markdown_table, write_outputs

    console = Console()
    configs = _configs(args)
    records = [_run_config(cfg) for cfg in track(configs, description="bench head", console=console)]
    _add_ratios(records)
    hardware = hardware_label(args.device)
    for r in records:
        r["hardware"] = hardware
    columns = [("method", "method"), ("classes", "classes"), ("sample_rate", "rate"), ("world_size", "ranks"),
               ("global_batch", "batch"), ("step_s", "step s"), ("samples_per_s", "samples/s"),
               ("peak_mem_mb", "peak MB/rank"), ("speedup_vs_full", "speed-up vs full"),
               ("mem_ratio_vs_full", "memory vs full"), ("status", "status")]
    table = (f"Head step (forward+backward+SGD), dim {args.dim}, {args.dtype}, {hardware}\n\n"
             + markdown_table(records, columns))
    fig = _figure(records, f"Partial FC head vs full softmax - batch {args.batch}, dim {args.dim}, "
                           f"{args.dtype}, {hardware}")
    paths = write_outputs(args.out, args.name, records, table, fig)
    print(table)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if all(r["status"] in ("ok", "oom") for r in records) else 1
