"""``partialfc bench ...``: each benchmark module exposes ``add_arguments(parser)`` and
``run(args) -> int``; optional heavy dependencies are imported inside ``run`` only."""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "head": ("partialfc.bench.head", "head step time and peak memory: Partial FC vs full softmax"),
    "data": ("partialfc.bench.data", "input pipeline images/s: DALI and the PyTorch loader; multi-rank start-up"),
    "train": ("partialfc.bench.train", "end-to-end training samples/s with the step split into phases"),
    "losses": ("partialfc.bench.losses", "held-out accuracy of each loss configuration, mean +- std over seeds"),
    "align": ("partialfc.bench.align", "face detectors on real photos: detection rate, s/photo, landmark agreement"),
}


def add_commands(subparsers) -> None:
    for name, (module_name, help_text) in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        parser = subparsers.add_parser(name, help=help_text)
        module.add_arguments(parser)
        parser.set_defaults(func=module.run)
