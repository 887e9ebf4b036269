"""``partialfc export backbone CKPT OUT`` and ``partialfc export centres CKPT OUT``.

``CKPT`` is a ``step_*`` directory, a ``checkpoints`` folder or a run directory (its latest
checkpoint)."""

from __future__ import annotations


def _backbone(args) -> int:
    from partialfc.train.artifacts import export_backbone

    record = export_backbone(args.checkpoint, args.out)
    print(f"wrote {record['backbone']} (embedding {record['embedding_size']}) to {args.out}")
    return 0


def _centres(args) -> int:
    from partialfc.train.artifacts import merge_centres

    weight = merge_centres(args.checkpoint, args.out)
    print(f"wrote class centres {tuple(weight.shape)} to {args.out}")
    return 0


def add_commands(subparsers) -> None:
    for name, func, help_text in (("backbone", _backbone, "save the backbone of a checkpoint alone"),
                                  ("centres", _centres, "merge the head's shards into one (classes, D) matrix")):
        command = subparsers.add_parser(name, help=help_text)
        command.add_argument("checkpoint")
        command.add_argument("out")
        command.set_defaults(func=func)
