"""``partialfc eval verify (--checkpoint CKPT | --onnx MODEL.onnx) --bin A.bin [--bin B.bin ...]
[--pairs pairs.txt --images PHOTOS]`` and
``partialfc eval ijb --dataset-dir DIR --target IJBC (--checkpoint CKPT | --onnx MODEL.onnx)``."""

from __future__ import annotations

import json

from partialfc.cli.data import add_align_arguments


def load_model(args):
    """The backbone named by ``--checkpoint`` (checkpoint, run dir or export) or ``--onnx``."""
    if args.onnx:
        from partialfc.eval.onnx import OnnxBackbone

        return OnnxBackbone(args.onnx)
    from partialfc.train.artifacts import load_backbone

    return load_backbone(args.checkpoint, args.device)


def add_model_arguments(parser) -> None:
    """``--checkpoint`` | ``--onnx`` (one of them), ``--batch-size``, ``--device``."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="checkpoint dir, run dir or exported backbone (.pt/.safetensors)")
    which.add_argument("--onnx", help="exported .onnx model, run by onnxruntime on CPU")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default: 128)")
    parser.add_argument("--device", default="cpu", help="torch device of the model (default: cpu)")


def _photo_pairs(args):
    """The verification set of ``--pairs`` over ``--images``, its photos aligned."""
    from partialfc.align.pairs import align_pairs
    from partialfc.cli.data import align_options
    from partialfc.errors import ConfigError
    from partialfc.eval.verification import VerificationSet

    if not args.images:
        raise ConfigError("--pairs needs --images, the folder of IMAGES/<name>/<name>_<NNNN>.jpg")
    images, issame, fallbacks = align_pairs(args.images, args.pairs, align_options(args), args.workers)
    for path, reason in fallbacks:
        print(f"  {path}: {reason}; its centre square is used")
    if fallbacks:
        print(f"{len(fallbacks)} photo(s) without a usable face were centre-cropped")
    return VerificationSet(args.pairs, images, issame)


def _verify(args) -> int:
    from partialfc.errors import ConfigError
    from partialfc.eval.verification import VerificationSet

    if not args.bin and not args.pairs:
        raise ConfigError("give --bin SET.bin and/or --pairs pairs.txt --images FOLDER")
    model = load_model(args)
    sets = [VerificationSet(path) for path in args.bin] + ([_photo_pairs(args)] if args.pairs else [])
    for vs in sets:
        result = vs.evaluate(model, batch_size=args.batch_size, device=args.device)
        print(json.dumps({"bin": vs.path, **result.as_dict()}) if args.json else
              f"{vs.path}: accuracy {result.accuracy:.4f} +- {result.accuracy_std:.4f}, "
              f"TAR@FAR=1e-3 {result.tar_at_far_1e3:.4f} ({result.num_pairs} pairs)")
    return 0


def _ijb(args) -> int:
    from partialfc.eval.ijb import evaluate_ijb, write_report

    result = evaluate_ijb(load_model(args), args.dataset_dir, args.target, flip=not args.no_flip,
                          detector_score=args.detector_score, batch_size=args.batch_size, device=args.device)
    json_path, png_path = write_report(result, args.out)
    print(f"{result.target}: {result.num_pairs} pairs, {result.num_faces} faces; TAR at FAR "
          + ", ".join(f"{far}: {tar:.4f}" for far, tar in result.tar_at_far.items()))
    print(f"wrote {json_path} and {png_path}")
    return 0


def add_commands(subparsers) -> None:
    verify = subparsers.add_parser("verify", help="10-fold verification accuracy on .bin sets")
    add_model_arguments(verify)
    verify.add_argument("--bin", default=[], action="append", help=".bin verification set (repeatable)")
    photos = verify.add_argument_group("pairs of raw photos, aligned like data align")
    photos.add_argument("--pairs", default=None, help="LFW pairs.txt: 'name i j' (same) or 'name1 i name2 j' per line")
    photos.add_argument("--images", default=None, help="folder of IMAGES/<name>/<name>_<NNNN>.jpg (unaligned)")
    photos.add_argument("--workers", type=int, default=1, help="processes aligning the photos")
    add_align_arguments(photos)
    verify.add_argument("--json", action="store_true", help="one JSON line per set")
    verify.set_defaults(func=_verify)
    ijb = subparsers.add_parser("ijb", help="IJB-B/C 1:1 verification: TAR at FAR 1e-6..1e-1, ROC PNG and JSON")
    add_model_arguments(ijb)
    ijb.add_argument("--dataset-dir", required=True, help="the target's folder (meta/, loose_crop/)")
    ijb.add_argument("--target", default="IJBC", choices=["IJBB", "IJBC"], help="which set (default: IJBC)")
    ijb.add_argument("--no-flip", action="store_true", help="embed each face alone, without its mirror image")
    ijb.add_argument("--detector-score", action="store_true", help="weight each face by its detector score")
    ijb.add_argument("--out", default=".", help="folder for <target>.json and <target>_roc.png (default: .)")
    ijb.set_defaults(func=_ijb)
