"""``partialfc plan``: will a run fit? Per-rank memory of the head (centres, optimizer state,
one step's working set) and the backbone at each (sample rate, storage dtype), whether it
fits a GPU's memory after a headroom, the most identities that fit, and a recommendation
(:mod:`partialfc.plan` says how each figure is counted)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from partialfc.errors import InputError


def _list(cast):
    def parse(text: str):
        try:
            return [cast(v) for v in text.split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list: {text!r}")
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--identities", type=float, required=True, help="classes of the whole head, e.g. 1e8")
    parser.add_argument("--images", type=float, help="images in the data set (shown only)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1, help="nodes")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU, GB (1e9 bytes)")
    parser.add_argument("--backbone", default="iresnet100", help="backbone name (partialfc.models)")
    parser.add_argument("--batch", type=int, default=128, help="batch per GPU")
    parser.add_argument("--rates", type=_list(float), default=[0.1, 0.3], help="sample rates, comma-separated")
    parser.add_argument("--dtypes", type=_list(str), default=["fp32", "bf16"], help="storage dtypes: fp32, bf16")
    parser.add_argument("--dim", type=int, default=512, help="embedding dim")
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="head optimizer")
    parser.add_argument("--headroom", type=float, default=0.10,
                        help="fraction of GPU memory kept free (CUDA context, fragmentation)")
    parser.add_argument("--activation-gb", type=float, help="backbone activations per GPU, GB (default: measured)")
    parser.add_argument("--measured", type=Path, help="a `partialfc bench head` JSON: its bytes per class shown too")
    parser.add_argument("--json", type=Path, help="also write the plan as JSON here")
    parser.add_argument("--format", choices=["table", "json"], default="table", help="what to print")


def measured_bytes_per_class(path: Path) -> dict:
    """``{(dtype, rate): bytes}`` per local class of one rank (the bench's fitted slope x its world) from a
    bench JSON's capacity records (or records a capacity fit can be made of)."""
    from partialfc.bench.capacity import capacity
    from partialfc.plan import METHODS

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"--measured {path}: {err}")
    records = data.get("records", data) if isinstance(data, dict) else data
    fits = [r for r in records if r.get("kind") == "capacity"] or capacity(
        [r for r in records if r.get("kind", "head") != "capacity" and "classes" in r], 1.0)
    out = {}
    for dtype, method in METHODS.items():
        for r in fits:
            name, _, rate = r["method"].partition(" rate ")
            if name == method and rate and r.get("bytes_per_class"):
                out[dtype, float(rate)] = r["bytes_per_class"] * r["world_size"]
    return out


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['identities']:.3g} identities on {result['world']} GPUs x "
                        f"{result['gpu_memory_gb']:g} GB, {result['backbone']}, batch {result['batch']}/GPU, "
                        f"D {result['dim']}, head {result['optimizer']}")
    measured = any("measured_head_gb" in r for r in result["rows"])
    cols = ["rate", "storage", "centres GB", "optimizer GB", "working GB", "head GB",
            *(["head GB (measured)"] if measured else []), "backbone GB", "activations GB", "total GB", "fits",
            "max identities"]
    for c in cols:
        table.add_column(c, justify="right")
    for r in result["rows"]:
        table.add_row(f"{r['rate']:g}", r["dtype"], *(f"{r[k]:.2f}" for k in
                      ("centres_gb", "optimizer_gb", "working_gb", "head_gb")),
                      *([f"{r['measured_head_gb']:.2f}" if "measured_head_gb" in r else "-"] if measured else []),
                      f"{r['backbone_gb']:.2f}", f"{r['activations_gb']:.2f}", f"{r['total_gb']:.2f}",
                      "yes" if r["fits"] else "NO", f"{r['max_identities']:.3g}")
    console = Console(width=None if sys.stdout.isatty() else 180)
    console.print(table)
    rec = result["recommended"]
    console.print(f"budget {result['budget_gb']:.1f} GB per GPU after {result['headroom']:.0%} headroom; head path: "
                  f"{result['head_path']}; activations: {result['activations']}")
    console.print("recommended: " + (f"head.sample_rate={rec['rate']:g} head.storage={rec['dtype']}" if rec else
                                     "nothing fits; more GPUs, a smaller batch or backbone"))


def run(args) -> int:
    from partialfc.plan import plan

    if args.identities != int(args.identities):
        raise InputError(f"--identities must be a whole number, got {args.identities}")
    if not 0 <= args.headroom < 1:
        raise InputError(f"--headroom must be in [0, 1), got {args.headroom}")
    if args.gpu_memory_gb <= 0:
        raise InputError(f"--gpu-memory-gb must be > 0, got {args.gpu_memory_gb}")
    result = plan(int(args.identities), args.gpus_per_node, args.nodes, args.gpu_memory_gb, args.backbone,
                  args.batch, tuple(args.rates), tuple(args.dtypes), args.dim, args.optimizer, args.headroom,
                  args.activation_gb, measured_bytes_per_class(args.measured) if args.measured else None)
    result["images"] = args.images
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0
