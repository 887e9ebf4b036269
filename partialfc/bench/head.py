"""``partialfc bench head``: step time, peak memory and FLOP/s of the classifier head for
several methods, class counts and world sizes, side by side in one run.

Methods (``--methods``):

- ``full_softmax``: plain data parallelism, every rank holds the whole class matrix,
  ``F.cross_entropy`` on the full logits, the dense gradient all-reduced (what DDP does),
  ``torch.optim.SGD``;
- ``partialfc``: the sharded head at each ``--sample-rate`` (rate 1 = model-parallel full
  softmax), ``SparseRowSGD``;
- ``dsoftmax_b`` / ``dsoftmax_kK`` (e.g. ``dsoftmax_k64``): D-Softmax on the sharded head,
  batch-sampled and 1/K-sampled.

Each configuration runs in fresh processes, so peak memory is its own:
``torch.cuda.max_memory_allocated`` on CUDA, the growth of peak RSS over the process's
baseline on CPU. A step = forward + backward + optimizer step of the head on random
embeddings; ``--batch`` is the global batch. FLOP/s counts the three matmuls of the head
(``6 * B * k * D`` per rank, ``k`` = centres used) against a dense matmul measured in the
same run. ``--budget-mb`` adds the largest class count whose per-rank peak fits the budget, from
a linear fit of peak memory against classes (an extrapolation, labelled as such).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from partialfc.bench.common import autocast, average_gradients, build_head, configs, method_label, peak_bytes, setup


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", default="1e5,1e6", help="comma-separated class counts")
    parser.add_argument("--sample-rate", default="1.0,0.1", help="comma-separated Partial FC rates")
    parser.add_argument("--methods", default="full_softmax,partialfc",
                        help="comma-separated: full_softmax, partialfc, dsoftmax_b, dsoftmax_k64, ...")
    parser.add_argument("--batch", type=int, default=512,
                        help="global batch: all ranks together, split over the ranks (as in bench train)")
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--nproc", default="1", help="comma-separated world sizes (gloo on CPU, NCCL on CUDA)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype of the matmul")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--budget-mb", type=float, default=None, help="memory budget per rank for the capacity table")
    parser.add_argument("--no-reference", action="store_true", help="skip the full-softmax reference")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/head"), help="output directory")
    parser.add_argument("--name", default="bench_head", help="base name of the output files")


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


def _measure(rank, world_size, cfg):
    """One rank: seconds per head step, peak bytes, centres used, the head's sample rate."""
    device, baseline, x, y = setup(rank, world_size, cfg)
    head, opt, replicated = build_head(cfg, device)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, cfg["dtype"]):
            out = head(x, y)
        out.backward()
        if world_size > 1 and replicated:  # data parallel: the whole class matrix's gradient
            average_gradients(replicated, world_size)
        opt.step()

    step_s = _time_steps(step, cfg["steps"], device)
    if cfg["method"] == "full_softmax":
        used = cfg["classes"]
    else:
        used = head.num_local if head.last_sampled is None else head.last_sampled.numel()
    return step_s, peak_bytes(device, baseline), used, head.sample_rate


def _matmul_peak(rank, world_size, device_name: str, dtype: str, threads: int) -> float:
    """FLOP/s of a large dense matmul: one GPU, or all ``threads`` CPU cores."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if device_name == "cuda" else "cpu")
    n = 8192 if device.type == "cuda" else 2048
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=amp), torch.randn(n, n, device=device, dtype=amp)
    seconds = _time_steps(lambda: a @ b, 5, device)
    return 2 * n**3 / seconds


def _run_config(cfg, peak_flops: float) -> dict:
    from partialfc.testing import run_distributed

    backend = "nccl" if cfg["device"] == "cuda" else "gloo"
    try:
        per_rank = run_distributed(_measure, cfg["world_size"], cfg, backend=backend, timeout=3600)
        step_s, peak = max(r[0] for r in per_rank), max(r[1] for r in per_rank)
        used, rate = max(r[2] for r in per_rank), per_rank[0][3]
        status = "ok"
    except RuntimeError as err:  # an out-of-memory configuration is a result, not a crash
        step_s = peak = float("nan")
        used, rate = 0, cfg["rate"]
        status = "oom" if "out of memory" in str(err).lower() else "error: " + str(err).splitlines()[-1][:200]
    # rows per rank: the sharded head sees the gathered global batch, data parallelism its own
    rows = cfg["batch"] if cfg["method"] != "full_softmax" else -(-cfg["batch"] // cfg["world_size"])
    flops = 6.0 * rows * used * cfg["dim"] / step_s
    # CPU ranks share the cores the peak was measured on; each CUDA rank has its own GPU
    share = cfg["world_size"] if cfg["device"] != "cuda" else 1
    return dict(method=cfg["method"], classes=cfg["classes"], sample_rate=rate, world_size=cfg["world_size"],
                global_batch=cfg["batch"], dim=cfg["dim"], dtype=cfg["dtype"], device=cfg["device"],
                step_s=step_s, samples_per_s=cfg["batch"] / step_s, peak_mem_mb=peak / 2**20,
                centres_per_rank=used, head_tflops=flops / 1e12, matmul_peak_tflops=peak_flops / 1e12,
                fraction_of_peak=flops * share / peak_flops, status=status)


def _add_ratios(records: list[dict]) -> None:
    ref = {(r["classes"], r["world_size"]): r for r in records if r["method"] == "full_softmax" and r["status"] == "ok"}
    for r in records:
        base = ref.get((r["classes"], r["world_size"]))
        if base is not None and r["status"] == "ok":
            r["speedup_vs_full"] = base["step_s"] / r["step_s"]
            r["mem_ratio_vs_full"] = r["peak_mem_mb"] / base["peak_mem_mb"]


def capacity(records: list[dict], budget_mb: float) -> list[dict]:
    """Per (method, world size): classes that fit ``budget_mb`` per rank, from a least-squares
    line through (classes, peak MB) of the measured points (at least two class counts)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["status"] == "ok":
            groups.setdefault((method_label(r), r["world_size"]), []).append(r)
    out = []
    for (label, world), rs in groups.items():
        xs = [float(r["classes"]) for r in rs]
        ys = [r["peak_mem_mb"] for r in rs]
        if len(set(xs)) < 2:
            continue
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        if slope <= 0:
            continue
        out.append(dict(kind="capacity", method=label, world_size=world, budget_mb=budget_mb,
                        mb_per_million_classes=slope * 1e6, max_classes=int((budget_mb - (my - slope * mx)) / slope),
                        basis="extrapolated from a linear fit of measured peak memory"))
    return out


def _figure(records: list[dict], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[str, list[dict]] = {}
    for r in records:
        if r["status"] == "ok":
            series.setdefault(f"{method_label(r)} x{r['world_size']}", []).append(r)
    for label, rs in series.items():
        rs = sorted(rs, key=lambda r: r["classes"])
        xs = [r["classes"] for r in rs]
        style = "k--o" if label.startswith("full_softmax") else "-o"
        ax_t.plot(xs, [r["samples_per_s"] for r in rs], style, label=label)
        ax_m.plot(xs, [r["peak_mem_mb"] for r in rs], style, label=label)
    for ax, ylabel in ((ax_t, "samples / s (head step)"), (ax_m, "peak memory per rank (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("identities (classes)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def run(args) -> int:
    from rich.console import Console
    from rich.progress import track

    from partialfc.bench.report import markdown_table, stamp_records, write_outputs
    from partialfc.testing import run_distributed

    runs = configs(args)
    peak_flops = run_distributed(_matmul_peak, 1, args.device, args.dtype, runs[0]["threads"],
                                 backend="nccl" if args.device == "cuda" else "gloo")[0]
    records = [_run_config(cfg, peak_flops) for cfg in
               track(runs, description="bench head", console=Console(stderr=True))]
    _add_ratios(records)
    hardware = stamp_records(records, "head", args.device)
    columns = [("method", "method"), ("classes", "classes"), ("sample_rate", "rate"), ("world_size", "ranks"),
               ("global_batch", "batch"), ("step_s", "step s"), ("samples_per_s", "samples/s"),
               ("peak_mem_mb", "peak MB/rank"), ("speedup_vs_full", "speed-up vs full"),
               ("mem_ratio_vs_full", "memory vs full"), ("fraction_of_peak", "of matmul peak"), ("status", "status")]
    table = (f"Head step (forward+backward+SGD), dim {args.dim}, {args.dtype}, {hardware}, torch {torch.__version__}; "
             f"dense matmul peak {peak_flops / 1e12:.3g} TFLOP/s\n\n" + markdown_table(records, columns))
    if args.budget_mb:
        fits = capacity(records, args.budget_mb)
        records += fits
        table += (f"\nLargest class count (over all ranks) with a per-rank budget of {args.budget_mb:g} MB (extrapolated from the measured "
                  "points by a linear fit):\n\n" + markdown_table(fits, [
                      ("method", "method"), ("world_size", "ranks"), ("mb_per_million_classes", "MB per 1M classes"),
                      ("max_classes", "max classes (all ranks)")]))
    fig = _figure([r for r in records if r.get("kind") != "capacity"],
                  f"Classifier head - batch {args.batch}, dim {args.dim}, {args.dtype}, {hardware}")
    paths = write_outputs(args.out, args.name, records, table, fig)
    print(table)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if all(r.get("status", "ok") in ("ok", "oom") for r in records) else 1
