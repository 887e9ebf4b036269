"""``partialfc bench data``: images/s of the input pipelines on one dataset.

Measures the DALI loader (CPU decode; GPU ``mixed`` decode too when CUDA is present) at
several thread counts and the PyTorch loader at several worker counts, each over ``--batches``
timed batches after ``--warmup`` batches, on a synthetic set (written once into ``--out``) or
on ``--data``. The time covers decode, flip, normalisation and the copy to the device.

``--startup-records N`` also measures the start-up of ``--startup-ranks`` gloo ranks opening
an ``N``-record index of header-only records (written into ``--startup-dir``, removed after):
the first start (no label cache) and the second (cache present), "before" (every rank reads
every record header, ``open_dataset(distributed=False)``) and "after" (rank 0 reads them and
broadcasts, what the trainer does), into ``NAME_startup.{json,md,png}``; each row counts the
scans (every rank's calls of the header scan) and says whether the cache exists after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

MODES = {"before": "every rank reads every header", "after": "rank 0 reads, broadcasts"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="dataset (.rec or prefix); default: a synthetic set in --out")
    parser.add_argument("--identities", type=int, default=200, help="synthetic set: identities")
    parser.add_argument("--images-per-identity", type=int, default=20, help="synthetic set: images per identity")
    parser.add_argument("--batch", type=int, default=128, help="images per batch (one loader, one process)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated PyTorch DataLoader worker counts")
    parser.add_argument("--dali-threads", default="1,2", help="comma-separated DALI thread counts")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/data"), help="output directory")
    parser.add_argument("--name", default="bench_data", help="base name of the output files")
    parser.add_argument("--startup-records", type=int, default=0,
                        help="also time the multi-rank start-up on an index of this many records (0: no)")
    parser.add_argument("--startup-ranks", type=int, default=8, help="start-up: gloo ranks on this machine")
    parser.add_argument("--startup-modes", default="before,after",
                        help="start-up: 'before' (every rank scans) and/or 'after' (rank 0 scans, broadcasts)")
    parser.add_argument("--startup-dir", type=Path, default=None,
                        help="start-up: folder for the index (default: a temporary one); removed after")
    parser.add_argument("--startup-only", action="store_true", help="measure the start-up only, no loaders")


def write_header_only_dataset(prefix: str, n: int) -> None:
    """``n`` plain-flavour records of a 24-byte IRHeader and no image (32 bytes framed), labels
    ``key % 100000`` (also exact in ``id2``): an index of any size in seconds."""
    import numpy as np

    from partialfc.data.recordio import IR_SIZE, MAGIC, write_index

    rec = np.zeros(n, dtype=[("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"),
                             ("id", "<u8"), ("id2", "<u8")])
    keys = np.arange(n, dtype=np.uint64)
    rec["magic"], rec["lrec"], rec["label"], rec["id"], rec["id2"] = MAGIC, IR_SIZE, keys % 100_000, keys, keys % 100_000
    rec.tofile(prefix + ".rec")
    write_index(prefix + ".idx", keys, keys * rec.itemsize)


def _startup_rank(rank: int, world_size: int, prefix: str, modes: list[str]) -> list[tuple[float, int, bool]]:
    """One rank's starts, a first (no cache: rank 0 removes it) and a second per mode:
    ``(seconds of its open_dataset after a barrier, header scans it ran, cache there after)``."""
    from partialfc.data import dataset_index
    from partialfc.ops.collectives import barrier

    scans, scan = [], dataset_index._scan_labels
    dataset_index._scan_labels = lambda *a: scans.append(1) or scan(*a)
    cache, out = prefix + ".idx.labels.npz", []
    for mode in modes:
        if rank == 0 and os.path.exists(cache):
            os.remove(cache)
        for _ in ("first", "second"):
            barrier()
            start, before = time.perf_counter(), len(scans)
            dataset_index.open_dataset(prefix, progress=False, distributed=mode == "after")
            out.append((time.perf_counter() - start, len(scans) - before))
            barrier()
            out[-1] += (os.path.exists(cache),)
    return out


def _startup_records(args, hardware: str) -> list[dict]:
    from partialfc.testing import run_distributed

    folder = Path(tempfile.mkdtemp(prefix="startup-", dir=args.startup_dir))
    try:
        prefix = str(folder / "tiny")
        write_header_only_dataset(prefix, args.startup_records)
        modes = [m for m in args.startup_modes.split(",") if m]
        if not modes or set(modes) - set(MODES):
            raise SystemExit(f"--startup-modes {args.startup_modes!r}: give 'before' and/or 'after'")
        by_rank = run_distributed(_startup_rank, args.startup_ranks, prefix, modes, timeout=24 * 3600.0)
        records = []
        for i, (mode, start) in enumerate((m, s) for m in modes for s in ("first", "second")):
            runs = [rank_runs[i] for rank_runs in by_rank]
            records.append({"mode": mode, "how": MODES[mode], "start": start, "records": args.startup_records,
                            "ranks": args.startup_ranks, "seconds": max(r[0] for r in runs),
                            "scans": sum(r[1] for r in runs), "cache_after": runs[0][2], "hardware": hardware})
            print(f"start-up {mode:6s} {start:6s}: {records[-1]['seconds']:.2f} s, {records[-1]['scans']} scans")
        return records
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _startup_figure(records: list[dict], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(range(len(records)), [r["seconds"] for r in records],
           color=["tab:red" if r["mode"] == "before" else "tab:green" for r in records])
    ax.set_xticks(range(len(records)), [f"{r['mode']}\n{r['start']} start\n{r['scans']} scans" for r in records],
                  fontsize=8)
    ax.set_ylabel("seconds (slowest rank)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10)
    return fig


def _run_startup(args, hardware: str) -> None:
    from partialfc.bench.report import markdown_table, write_outputs

    records = _startup_records(args, hardware)
    columns = [("mode", "mode"), ("how", "labels"), ("start", "start"), ("records", "records"),
               ("ranks", "ranks"), ("seconds", "s (slowest rank)"), ("scans", "header scans"),
               ("cache_after", "cache after")]
    title = f"Start-up of {args.startup_ranks} gloo ranks, {args.startup_records} records, {hardware}"
    table = f"{title}\n\n" + markdown_table(records, columns)
    paths = write_outputs(args.out, f"{args.name}_startup", records, table, _startup_figure(records, title))
    print(table)
    print("wrote " + ", ".join(str(p) for p in paths))


def _time_loader(loader, warmup: int, batches: int, device) -> tuple[int, float]:
    """(images, seconds) over ``batches`` batches after ``warmup``, cycling epochs as needed."""
    import torch

    stream = loader.forever()
    for _ in range(warmup):
        next(stream)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(stream)[1])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images, time.perf_counter() - start


def _configs(args, cuda: bool, have_dali: bool) -> list[dict]:
    configs = [{"loader": "torch", "device": "cpu", "parallelism": w} for w in
               (int(v) for v in args.workers.split(",") if v)]
    if have_dali:
        threads = [int(v) for v in args.dali_threads.split(",") if v]
        configs += [{"loader": "dali", "device": d, "parallelism": t} for d in (["cpu", "cuda"] if cuda else ["cpu"])
                    for t in threads]
    return configs


def _figure(records: list[dict], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['loader']} {r['device']}\n{r['parallelism']} {'thr' if r['loader'] == 'dali' else 'wkr'}"
              for r in records]
    colours = ["tab:green" if r["loader"] == "dali" else "tab:blue" for r in records]
    ax.bar(range(len(records)), [r.get("images_per_s", 0) for r in records], color=colours)
    ax.set_xticks(range(len(records)), labels, fontsize=8)
    ax.set_ylabel("images / s")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10)
    return fig


def run(args) -> int:
    import importlib.util

    import torch

    from partialfc.bench.report import hardware_label, markdown_table, write_outputs
    from partialfc.data.dataset_index import open_dataset
    from partialfc.data.synthetic import write_synthetic_dataset
    from partialfc.data.torch_loader import TorchLoader

    if args.startup_records > 0:
        _run_startup(args, hardware_label("cpu"))
    if args.startup_only:
        return 0
    path = args.data
    if path is None:
        path = str(args.out / f"synthetic_{args.identities}x{args.images_per_identity}")
        if not Path(path + ".rec").exists():
            write_synthetic_dataset(path, args.identities, args.images_per_identity, verification_pairs=0,
                                    shuffle=True)
    dataset = open_dataset(path)
    cuda = torch.cuda.is_available()
    have_dali = importlib.util.find_spec("nvidia.dali") is not None
    records = []
    for cfg in _configs(args, cuda, have_dali):
        device = torch.device(cfg["device"])
        common = dict(rank=0, world_size=1, device=device, seed=0)
        if cfg["loader"] == "dali":
            from partialfc.data.dali_loader import DaliLoader
            loader = DaliLoader(dataset, args.batch, num_threads=cfg["parallelism"], **common)
        else:
            loader = TorchLoader(dataset, args.batch, num_workers=cfg["parallelism"], **common)
        images, seconds = _time_loader(loader, args.warmup, args.batches, device)
        record = {**cfg, "batch": args.batch, "images": images, "seconds": seconds,
                  "images_per_s": images / seconds, "dataset": Path(dataset.rec_path).name,
                  "hardware": hardware_label(cfg["device"])}
        records.append(record)
        print(f"{cfg['loader']:5s} {cfg['device']:4s} x{cfg['parallelism']}: {record['images_per_s']:.0f} images/s")
        del loader
    hardware = hardware_label("cuda" if cuda else "cpu")
    columns = [("loader", "loader"), ("device", "decode on"), ("parallelism", "threads / workers"),
               ("batch", "batch"), ("images", "images"), ("seconds", "s"), ("images_per_s", "images/s")]
    table = (f"Input pipeline throughput, {dataset.num_images} images 112x112 JPEG "
             f"({Path(dataset.rec_path).name}), {hardware}\n\n" + markdown_table(records, columns))
    if not have_dali:
        table += "\nDALI not installed (`pip install partialfc[dali]`): DALI rows skipped.\n"
    fig = _figure(records, f"Input pipeline images/s - batch {args.batch}, {hardware}")
    paths = write_outputs(args.out, args.name, records, table, fig)
    print(table)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
