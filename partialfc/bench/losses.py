"""``partialfc bench losses``: held-out verification accuracy and TAR@FAR=1e-3 of each loss
configuration, as mean +- std over seeds, with the same backbone, data and budget.

Each (loss, sample rate, seed) is one ``partialfc train`` run in its own process(es) under
``--out``/runs; the config differs between runs only in ``seed``, ``loss`` and
``head.sample_rate`` (and, for ``search_softmax``, the ``search:`` section: a population
of ``--population`` one-rank candidates started with torchrun; same epochs, so each
candidate sees the budget of one fixed-loss run). Data: the synthetic identities
(``--identities x --images-per-identity``, held-out pairs of other identities) or a given
``--rec`` with its ``--bin``. The search's reward set is never the reported one: a second
synthetic set of other identities (``--reward-bin`` with real data).

Writes ``losses.json`` (one record per configuration, with every seed's numbers),
``losses.md`` and ``losses.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# name -> (loss.name, loss.params); s=32 throughout (X2's published setting on small data)
PRESETS = {
    "normface": ("normface", {"s": 32.0}),
    "cosface": ("cosface", {"s": 32.0, "m": 0.3}),
    "arcface": ("arcface", {"s": 32.0, "m": 0.5}),
    "x2_exact": ("x2softmax", {"s": 32.0, "a": -0.9, "k": 0.65, "gradient": "exact"}),
    "x2_st": ("x2softmax", {"s": 32.0, "a": -0.9, "k": 0.65, "gradient": "straight_through"}),
    "dsoftmax": ("dsoftmax", {"s": 32.0, "d": 0.9}),
    "random_softmax": ("random_softmax", {"s": 32.0, "mu": 0.0, "sigma": 0.2}),
    "search_softmax": ("search_softmax", {"s": 32.0}),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--losses", default=",".join(PRESETS), help=f"comma-separated presets: {', '.join(PRESETS)}")
    parser.add_argument("--sample-rate", default="1.0", help="comma-separated Partial FC sample rates")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per configuration")
    parser.add_argument("--rec", default=None, help="a .rec dataset (default: synthetic identities)")
    parser.add_argument("--bin", default=None, help="the held-out .bin reported (with --rec)")
    parser.add_argument("--reward-bin", default=None, help="the search's reward .bin (with --rec)")
    parser.add_argument("--identities", type=int, default=200, help="synthetic training identities")
    parser.add_argument("--images-per-identity", type=int, default=12, help="synthetic images per identity")
    parser.add_argument("--pairs", type=int, default=1000, help="synthetic held-out pairs")
    parser.add_argument("--backbone", default="iresnet_tiny", help="backbone name (partialfc.models)")
    parser.add_argument("--dim", type=int, default=128, help="embedding size")
    parser.add_argument("--batch", type=int, default=64, help="data.batch_size of each run (per process)")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs of each run")
    parser.add_argument("--lr", type=float, default=0.2, help="learning rate of backbone and head")
    parser.add_argument("--population", type=int, default=2, help="search_softmax candidates (one process each)")
    parser.add_argument("--start-epoch", type=int, default=1, help="search_softmax's search.start_epoch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out", default="benchmarks/results/losses", help="output directory")


def base_config(args, out: Path) -> dict:
    """The config every run shares (as a ``base:`` file)."""
    data: dict = {"batch_size": args.batch, "num_workers": 0, "cache_dir": str(out / "runs" / "data")}
    if args.rec:
        data["rec"] = args.rec
    else:
        data["synthetic"] = {"num_identities": args.identities, "images_per_identity": args.images_per_identity,
                             "verification_identities": 100, "verification_pairs": args.pairs}
    schedule = {"name": "cosine", "warmup_fraction": 0.05}
    return {"data": data, "model": {"backbone": args.backbone, "embedding_size": args.dim},
            "optim": {"lr": args.lr, "schedule": schedule},
            "head": {"optimizer": {"lr": args.lr, "schedule": schedule}},
            "train": {"epochs": args.epochs, "threads": args.threads, "precision": "fp32"},
            "checkpoint": {"every_steps": 0, "keep": 1, "resume": "none"},
            "log": {"every_steps": 20, "plot": False, "wandb": {"mode": "disabled"}},
            "eval": {"every_steps": 0, "bins": [args.bin] if args.bin else [], "at_end": True}}


def reward_bin(args, out: Path) -> str:
    """The search's reward set: ``--reward-bin``, or held-out pairs of a second synthetic set."""
    if args.rec:
        if not args.reward_bin:
            raise SystemExit("search_softmax with --rec needs --reward-bin")
        return args.reward_bin
    from partialfc.data.synthetic import write_synthetic_dataset

    prefix = out / "runs" / "data" / "reward" / "reward"
    if not Path(f"{prefix}.bin").exists():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic_dataset(str(prefix), 8, 2, verification_identities=100, verification_pairs=args.pairs,
                                seed=1000)
    return f"{prefix}.bin"


def run_one(args, out: Path, base: Path, preset: str, rate: float, seed: int) -> dict:
    """Train one configuration; returns the held-out ``accuracy`` and ``tar_at_far_1e3``."""
    name, params = PRESETS[preset]
    if preset == "random_softmax":
        params = {**params, "seed": seed}
    run_dir = out / "runs" / f"{preset}-r{rate:g}-s{seed}"
    overrides = [f"run_dir={run_dir}", f"seed={seed}", f"data.seed={seed}", f"loss.name={name}",
                 f"loss.params={json.dumps(params)}", f"head.sample_rate={rate}"]
    command = [sys.executable, "-m", "partialfc.cli", "train", str(base), *overrides]
    if preset == "search_softmax":
        overrides += ["search.enabled=true", f"search.population={args.population}",
                      f"search.start_epoch={args.start_epoch}", f"search.reward={reward_bin(args, out)}"]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={args.population}", "-m", "partialfc.cli", "train", str(base), *overrides]
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "bench.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS":
                                                                                   str(args.threads)})
    if done.returncode != 0:
        raise RuntimeError(f"{preset} rate {rate} seed {seed} failed (exit {done.returncode}); see {run_dir}/bench.log")
    evals = [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["kind"] == "eval"]
    last = evals[-1]
    return {"accuracy": last["accuracy"], "tar_at_far_1e3": last["tar_at_far_1e3"]}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(preset: str, rate: float, runs: list[dict]) -> dict:
    """One record: every seed's numbers and their mean and (sample) std."""
    record = {"loss": preset, "sample_rate": rate, "seeds": len(runs)}
    for key in ("accuracy", "tar_at_far_1e3"):
        values = [r[key] for r in runs]
        record[key], record[f"{key}_std"] = _mean_std(values)
        record[f"{key}_per_seed"] = values
    return record


def table(records: list[dict]) -> str:
    lines = ["| loss | sample rate | seeds | accuracy | TAR@FAR=1e-3 | accuracy per seed |", "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['loss']} | {r['sample_rate']:g} | {r['seeds']} | {r['accuracy']:.4f} +- "
                     f"{r['accuracy_std']:.4f} | {r['tar_at_far_1e3']:.4f} +- {r['tar_at_far_1e3_std']:.4f} | "
                     + " / ".join(f"{v:.4f}" for v in r["accuracy_per_seed"]) + " |")
    return "\n".join(lines) + "\n"


def figure(records: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(records)), 3.5))
    labels = [f"{r['loss']}\n{r['sample_rate']:g}" for r in records]
    ax.bar(range(len(records)), [r["accuracy"] for r in records], yerr=[r["accuracy_std"] for r in records],
           capsize=4, color="tab:blue")
    low = min(r["accuracy"] - r["accuracy_std"] for r in records)
    ax.set_ylim(max(0.5, low - 0.02), 1.0)
    ax.set_xticks(range(len(records)), labels, fontsize=7)
    ax.set_ylabel("held-out accuracy (mean +- std)")
    fig.tight_layout()
    return fig


def run(args) -> int:
    from partialfc.bench.report import stamp_records, write_outputs

    presets = [p.strip() for p in args.losses.split(",") if p.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise SystemExit(f"unknown --losses {unknown}; available: {', '.join(PRESETS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base.yaml"
    import yaml

    base.write_text(yaml.safe_dump(base_config(args, out)))
    records = []
    for preset in presets:
        for rate in (float(r) for r in args.sample_rate.split(",")):
            runs = []
            for seed in range(args.seeds):
                runs.append(run_one(args, out, base, preset, rate, seed))
                print(f"{preset} rate {rate:g} seed {seed}: accuracy {runs[-1]['accuracy']:.4f} "
                      f"TAR@FAR=1e-3 {runs[-1]['tar_at_far_1e3']:.4f}", flush=True)
            records.append(summarise(preset, rate, runs))
    hardware = stamp_records(records, "losses", "cpu")
    text = table(records)
    paths = write_outputs(out, "losses", records, f"Held-out verification, {hardware}\n\n" + text, figure(records))
    print(text + "\n".join(map(str, paths)))
    return 0
