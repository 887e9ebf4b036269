"""``partialfc eval verify --checkpoint CKPT --bin A.bin [--bin B.bin ...]``."""

from __future__ import annotations

import json


def _verify(args) -> int:
    from partialfc.eval.verification import VerificationSet
    from partialfc.train.artifacts import load_backbone

    model = load_backbone(args.checkpoint, args.device)
    sets = [VerificationSet(path) for path in args.bin]
    for vs in sets:
        result = vs.evaluate(model, batch_size=args.batch_size, device=args.device)
        print(json.dumps({"bin": vs.path, **result.as_dict()}) if args.json else
              f"{vs.path}: accuracy {result.accuracy:.4f} +- {result.accuracy_std:.4f}, "
              f"TAR@FAR=1e-3 {result.tar_at_far_1e3:.4f} ({result.num_pairs} pairs)")
    return 0


def add_commands(subparsers) -> None:
    verify = subparsers.add_parser("verify", help="10-fold verification accuracy on .bin sets")
    verify.add_argument("--checkpoint", required=True, help="checkpoint dir, run dir or exported backbone")
    verify.add_argument("--bin", required=True, action="append", help=".bin verification set (repeatable)")
    verify.add_argument("--batch-size", type=int, default=128)
    verify.add_argument("--device", default="cpu")
    verify.add_argument("--json", action="store_true", help="one JSON line per set")
    verify.set_defaults(func=_verify)
