"""``partialfc embed (--checkpoint CKPT | --onnx MODEL.onnx) IMAGE_OR_FOLDER ... --out EMB.npy``."""

from __future__ import annotations

from partialfc.cli.eval import add_model_arguments, load_model


def add_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files and folders (searched recursively, sorted)")
    parser.add_argument("--out", required=True, help="output .npy (N, D); the image paths go to OUT.txt")
    parser.add_argument("--no-flip", action="store_true", help="embed each image alone, without its mirror image")
    add_model_arguments(parser)


def run(args) -> int:
    import numpy as np

    from partialfc.eval.embed import embed_files, list_images

    paths = list_images(args.inputs)
    embeddings = embed_files(load_model(args), paths, args.batch_size, args.device, flip=not args.no_flip)
    np.save(args.out, embeddings)
    with open(f"{args.out}.txt", "w") as f:
        f.writelines(f"{p}\n" for p in paths)
    print(f"wrote {embeddings.shape} embeddings to {args.out} (paths in {args.out}.txt)")
    return 0
