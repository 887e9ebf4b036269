"""``partialfc bench data``: images/s of the input pipelines on one dataset.

Measures the DALI loader (CPU decode; GPU ``mixed`` decode too when CUDA is present) at
several thread counts and the PyTorch loader at several worker counts, each over ``--batches``
timed batches after ``--warmup`` batches, on a synthetic set (written once into ``--out``) or
on ``--data``. The time covers decode, flip, normalisation and the copy to the device.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


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
