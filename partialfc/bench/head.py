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

Peak memory per rank (``peak_mem_mb``, its source in ``memory_source``; see
:mod:`partialfc.bench.capacity`): ``torch.cuda.max_memory_allocated`` on CUDA (``allocator``),
the peak bytes of the live tensors on CPU (``tensor_accounting``; the growth of peak RSS,
which the load moves, is kept as ``peak_rss_mb`` for comparison). On CUDA at world size 1 all
configurations run one after the other in one process, the allocator emptied and its peak
reset between them (the centres are drawn on the GPU); otherwise each runs in fresh
processes. A step = forward + backward + optimizer step of the head on random embeddings;
``--batch`` is the global batch. FLOP/s counts the three matmuls of the head
(``6 * B * k * D`` per rank, ``k`` = centres used) against a dense matmul measured in the
same run. ``--budget-mb`` adds one ``kind: capacity`` record per method and world size: the
largest class count whose per-rank peak fits the budget, from a linear fit of peak memory
against classes (an extrapolation, labelled as such), or ``status: no_fit: ...`` saying why
there is none.
"""

from __future__ import annotations

import argparse
import gc
import time
import traceback
from pathlib import Path

import torch

from partialfc.bench.capacity import MemoryMeter, capacity
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


def _time_steps(step, steps: int, device: torch.device, warmup: int = 2) -> float:
    for _ in range(warmup):
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
    """One rank: seconds per head step, peak bytes and their source, peak RSS growth (CPU),
    centres used, the head's sample rate. The peak is the steps' with the head built: its two
    warm-up steps (the optimizer state exists after the first), on CUDA the timed steps too."""
    device, baseline, x, y = setup(rank, world_size, cfg)
    meter = MemoryMeter(device)
    with meter.counting(x, y):
        head, opt, replicated = build_head(cfg, device)

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast(device, cfg["dtype"]):
                out = head(x, y)
            out.backward()
            if world_size > 1 and replicated:  # data parallel: the whole class matrix's gradient
                average_gradients(replicated, world_size)
            opt.step()

        meter.steps_start()
        for _ in range(2):
            step()
    step_s = _time_steps(step, cfg["steps"], device, warmup=0)
    if cfg["method"] == "full_softmax":
        used = cfg["classes"]
    else:
        used = head.num_local if head.last_sampled is None else head.last_sampled.numel()
    rss = peak_bytes(torch.device("cpu"), baseline) if device.type == "cpu" else None
    return step_s, meter.peak_bytes(), meter.source, rss, used, head.sample_rate


def _matmul_peak(device_name: str, dtype: str, threads: int) -> float:
    """FLOP/s of a large dense matmul: one GPU, or all ``threads`` CPU cores."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if device_name == "cuda" else "cpu")
    n = 8192 if device.type == "cuda" else 2048
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=amp), torch.randn(n, n, device=device, dtype=amp)
    seconds = _time_steps(lambda: a @ b, 5, device)
    return 2 * n**3 / seconds


def _status(error: str) -> str:
    """An out-of-memory configuration is a result (``oom``), not a crash."""
    text = error.lower()
    if "out of memory" in text or "not enough memory" in text:
        return "oom"
    return "error: " + error.strip().splitlines()[-1][:200]


def _release(device_name: str) -> None:
    """Between configurations sharing a process: hand the freed blocks back to the device."""
    gc.collect()
    if device_name == "cuda":
        torch.cuda.empty_cache()


def _measure_each(rank, world_size, cfgs, peak_args):
    """One rank of a group: the dense matmul peak first when ``peak_args`` (else None), then
    every configuration of ``cfgs`` in turn, each ``(status, measurement or None)``. On one
    rank a failed configuration (out of memory, an error) is its status and the next still
    runs; on several the error ends the group (another rank would wait for it in a collective)."""
    peak = _matmul_peak(*peak_args) if peak_args else None
    _release(peak_args[0] if peak_args else "cpu")
    results = []
    for cfg in cfgs:
        try:
            results.append(("ok", _measure(rank, world_size, cfg)))
        except Exception:  # noqa: BLE001 - reported as the configuration's status
            if world_size > 1:
                raise
            results.append((_status(traceback.format_exc()), None))
        _release(cfg["device"])
        if rank == 0:  # progress in the log, even if the run is cut short later
            status, got = results[-1]
            done = f"{got[0]:.4g} s/step, {got[1] / 2**20:.0f} MB" if got else status
            rate = "" if cfg["rate"] is None else f" rate {cfg['rate']:g}"
            print(f"bench head: {cfg['method']}{rate} {cfg['classes']:g} classes x{world_size}: {done}", flush=True)
    return peak, results


def _groups(runs: list[dict]) -> list[list[dict]]:
    """Configurations that share a process: on CUDA at world size 1 all of them (peak memory
    from the allocator, reset between them; a Triton configuration last, since a fault in a
    kernel spoils the process's CUDA context); otherwise each its own processes, so that a
    CPU rank's peak RSS is its own and a failing multi-rank configuration stops only itself."""
    shared = [c for c in runs if c["device"] == "cuda" and c["world_size"] == 1]
    shared.sort(key=lambda c: c["method"] == "partialfc_triton")
    alone = [[c] for c in runs if not any(c is s for s in shared)]
    return ([shared] if shared else []) + alone


def _measure_all(runs: list[dict], args) -> tuple[float, dict]:
    """The dense matmul peak and ``{id(cfg): (status, measurement)}`` for every configuration."""
    from rich.console import Console
    from rich.progress import track

    from partialfc.testing import run_distributed

    backend = "nccl" if args.device == "cuda" else "gloo"
    peak_args = (args.device, args.dtype, runs[0]["threads"])
    groups = _groups(runs)
    peak_flops = None
    first = groups[0][0]
    if not (first["device"] == "cuda" and first["world_size"] == 1):  # no shared process: one of its own (clean RSS)
        peak_flops = run_distributed(_measure_each, 1, [], peak_args, backend=backend)[0][0]
    results: dict[int, tuple] = {}
    for group in track(groups, description="bench head", console=Console(stderr=True)):
        world = group[0]["world_size"]
        try:
            per_rank = run_distributed(_measure_each, world, group, peak_args if peak_flops is None else None,
                                       backend=backend, timeout=3600)
        except RuntimeError as err:
            for cfg in group:
                results[id(cfg)] = (_status(str(err)), None)
            continue
        if peak_flops is None:
            peak_flops = per_rank[0][0]
        for i, cfg in enumerate(group):
            statuses = [r[1][i][0] for r in per_rank]
            status = next((s for s in statuses if s != "ok"), "ok")
            results[id(cfg)] = (status, [r[1][i][1] for r in per_rank] if status == "ok" else None)
    return peak_flops if peak_flops is not None else float("nan"), results


def _record(cfg, status: str, per_rank, peak_flops: float) -> dict:
    if per_rank:
        step_s, peak = max(r[0] for r in per_rank), max(r[1] for r in per_rank)
        source, used, rate = per_rank[0][2], max(r[4] for r in per_rank), per_rank[0][5]
        rss = max(r[3] for r in per_rank) if per_rank[0][3] is not None else None
    else:
        step_s = peak = float("nan")
        source, rss, used, rate = None, None, 0, cfg["rate"]
    # rows per rank: the sharded head sees the gathered global batch, data parallelism its own
    rows = cfg["batch"] if cfg["method"] != "full_softmax" else -(-cfg["batch"] // cfg["world_size"])
    flops = 6.0 * rows * used * cfg["dim"] / step_s
    # CPU ranks share the cores the peak was measured on; each CUDA rank has its own GPU
    share = cfg["world_size"] if cfg["device"] != "cuda" else 1
    record = dict(method=cfg["method"], classes=cfg["classes"], sample_rate=rate, world_size=cfg["world_size"],
                  global_batch=cfg["batch"], dim=cfg["dim"], dtype=cfg["dtype"], device=cfg["device"],
                  step_s=step_s, samples_per_s=cfg["batch"] / step_s, peak_mem_mb=peak / 2**20,
                  memory_source=source, centres_per_rank=used, head_tflops=flops / 1e12,
                  matmul_peak_tflops=peak_flops / 1e12, fraction_of_peak=flops * share / peak_flops, status=status)
    if rss is not None:
        record["peak_rss_mb"] = rss / 2**20
    return record


def _add_ratios(records: list[dict]) -> None:
    ref = {(r["classes"], r["world_size"]): r for r in records if r["method"] == "full_softmax" and r["status"] == "ok"}
    for r in records:
        base = ref.get((r["classes"], r["world_size"]))
        if base is not None and r["status"] == "ok":
            r["speedup_vs_full"] = base["step_s"] / r["step_s"]
            r["mem_ratio_vs_full"] = r["peak_mem_mb"] / base["peak_mem_mb"]


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
    from partialfc.bench.report import markdown_table, stamp_records, write_outputs

    runs = configs(args)
    peak_flops, measured = _measure_all(runs, args)
    records = [_record(cfg, *measured[id(cfg)], peak_flops) for cfg in runs]
    _add_ratios(records)
    hardware = stamp_records(records, "head", args.device)
    columns = [("method", "method"), ("classes", "classes"), ("sample_rate", "rate"), ("world_size", "ranks"),
               ("global_batch", "batch"), ("step_s", "step s"), ("samples_per_s", "samples/s"),
               ("peak_mem_mb", "peak MB/rank"), ("speedup_vs_full", "speed-up vs full"),
               ("mem_ratio_vs_full", "memory vs full"), ("fraction_of_peak", "of matmul peak"), ("status", "status")]
    sources = ", ".join(sorted({r["memory_source"] for r in records if r["memory_source"]})) or "none"
    table = (f"Head step (forward+backward+SGD), dim {args.dim}, {args.dtype}, {hardware}, torch {torch.__version__}; "
             f"dense matmul peak {peak_flops / 1e12:.3g} TFLOP/s; peak memory from: {sources}\n\n"
             + markdown_table(records, columns))
    if args.budget_mb:
        fits = capacity(records, args.budget_mb)
        records += fits
        table += (f"\nLargest class count (over all ranks) with a per-rank budget of {args.budget_mb:g} MB (extrapolated from the measured "
                  "points by a linear fit; the floor is the class state, centre + momentum at the storage dtype):\n\n"
                  + markdown_table([{k: v for k, v in f.items() if v is not None} for f in fits], [
                      ("method", "method"), ("world_size", "ranks"), ("bytes_per_class", "bytes per class"),
                      ("analytic_bytes_per_class", "class state bytes"), ("fixed_mb", "fixed MB"),
                      ("max_classes", "max classes (all ranks)"), ("source", "source"), ("status", "status")]))
    fig = _figure([r for r in records if r.get("kind") != "capacity"],
                  f"Classifier head - batch {args.batch}, dim {args.dim}, {args.dtype}, {hardware}")
    paths = write_outputs(args.out, args.name, records, table, fig)
    print(table)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if all(r.get("status", "ok") in ("ok", "oom") for r in records if r.get("kind") != "capacity") else 1
