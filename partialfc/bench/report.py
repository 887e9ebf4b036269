"""Shared output of the benchmarks: JSON records, a Markdown table and a PNG plot."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def hardware_label(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    import os

    return f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()}"


def stamp_records(records: list[dict], benchmark: str, device: str) -> str:
    """Add ``hardware``, ``torch`` and ``command`` (the ``partialfc bench <benchmark> ...``
    command line when run from the CLI, else "") to every record; return the hardware label."""
    import sys

    hardware = hardware_label(device)
    from_cli = sys.argv[1:3] == ["bench", benchmark]
    command = f"partialfc bench {benchmark} " + " ".join(sys.argv[3:]) if from_cli else ""
    for r in records:
        r.update(hardware=hardware, torch=torch.__version__, command=command)
    return hardware


def markdown_table(records: list[dict], columns: list[tuple[str, str]]) -> str:
    """``columns``: (key, header) pairs; floats get 4 significant digits."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k, _ in columns) + " |" for r in records]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, name: str, records: list[dict], table: str, figure) -> list[Path]:
    """Write ``name.json``, ``name.md`` and ``name.png`` into ``out_dir``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md", out_dir / f"{name}.png"]
    paths[0].write_text(json.dumps(records, indent=2) + "\n")
    paths[1].write_text(table)
    figure.savefig(paths[2], dpi=120, bbox_inches="tight")
    return paths
