"""``partialfc export ...``: a backbone out of a checkpoint (``.pt``, ``.safetensors``, ``.onnx``),
the merged class centres, and insightface (arcface_torch) weights in.

``CKPT`` is a ``step_*`` directory, a ``checkpoints`` folder, a run directory (its latest
checkpoint) or an exported backbone file."""

from __future__ import annotations

from partialfc.eval.export import SAFETENSORS_SUFFIX, SUFFIXES


def _backbone(args) -> int:
    from partialfc.train.artifacts import export_backbone

    record = export_backbone(args.checkpoint, args.out, args.suffixes)
    print(f"wrote {record['backbone']} (embedding {record['embedding_size']}) to {args.out}")
    return 0


def _centres(args) -> int:
    from partialfc.train.artifacts import merge_centres

    weight = merge_centres(args.checkpoint, args.out)
    print(f"wrote class centres {tuple(weight.shape)} to {args.out}")
    return 0


def _onnx(args) -> int:
    from partialfc.eval.onnx import OPSET, TOLERANCE, export_checked
    from partialfc.train.artifacts import load_backbone

    opset = args.opset or OPSET
    difference = export_checked(load_backbone(args.checkpoint), args.out, opset)
    checked = ", ".join(f"batch {b}: {d:.2e}" for b, d in difference.items())
    print(f"wrote {args.out} (opset {opset}, dynamic batch); max |onnxruntime - torch| / max |torch|: "
          f"{checked} (tolerance {TOLERANCE:g})")
    return 0


def _import_insightface(args) -> int:
    from partialfc.eval.export import write_exported
    from partialfc.models.insightface import read_insightface

    record = read_insightface(args.model, args.backbone, args.embedding_size)
    write_exported(record, args.out)
    print(f"wrote {record['backbone']} (embedding {record['embedding_size']}, "
          f"{len(record['state_dict'])} tensors) to {args.out}")
    return 0


def add_commands(subparsers) -> None:
    from partialfc.models.insightface import INSIGHTFACE_NAMES

    for name, help_text, suffixes in (
            ("backbone", "save the backbone of a checkpoint alone (.pt/.pth, or .safetensors)", SUFFIXES),
            ("safetensors", "save the backbone of a checkpoint as .safetensors", (SAFETENSORS_SUFFIX,))):
        command = subparsers.add_parser(name, help=help_text)
        command.add_argument("checkpoint", help="checkpoint dir, run dir or exported backbone")
        command.add_argument("out", help=f"output file ({', '.join(suffixes)})")
        command.set_defaults(func=_backbone, suffixes=suffixes)
    centres = subparsers.add_parser("centres", help="merge the head's shards into one (classes, D) matrix")
    centres.add_argument("checkpoint", help="checkpoint dir or run dir")
    centres.add_argument("out", help="output file (torch.save of the matrix)")
    centres.set_defaults(func=_centres)
    onnx = subparsers.add_parser("onnx", help="ONNX with a dynamic batch, checked with onnxruntime against PyTorch")
    onnx.add_argument("checkpoint", metavar="backbone", help="checkpoint dir, run dir or exported backbone")
    onnx.add_argument("out", help="output .onnx file")
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset (default: partialfc.eval.onnx.OPSET, printed)")
    onnx.set_defaults(func=_onnx)
    insight = subparsers.add_parser("import-insightface",
                                    help="convert an arcface_torch state dict (model.pt) into a partialfc backbone")
    insight.add_argument("model", help="torch.save(backbone.state_dict()) of arcface_torch")
    insight.add_argument("out", help="output backbone file (.pt/.pth or .safetensors)")
    renamed = [ours for theirs, ours in INSIGHTFACE_NAMES.items() if ours != theirs]  # the ViTs keep theirs
    insight.add_argument("--backbone", required=True, choices=[*INSIGHTFACE_NAMES, *renamed],
                         metavar="NAME", help=f"architecture: {', '.join(INSIGHTFACE_NAMES)} or our names "
                                              f"({', '.join(renamed)})")
    insight.add_argument("--embedding-size", type=int, default=None,
                         help="embedding width (default: read from the weights)")
    insight.set_defaults(func=_import_insightface)
