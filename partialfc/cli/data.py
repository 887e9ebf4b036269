"""``partialfc data pack|check|shuffle|synth|index|make-bin|align|prepare``."""

from __future__ import annotations


def _pack(args) -> int:
    from partialfc.data.tools import pack_folder
    result = pack_folder(args.src_dir, args.out_prefix, None if args.size <= 0 else args.size, args.quality,
                         args.workers, skip_bad=args.skip_bad)
    print(f"packed {result.num_images} images of {result.num_classes} identities into {args.out_prefix}.rec/.idx "
          f"(names in {args.out_prefix}.names)")
    if result.skipped:
        print(f"skipped {len(result.skipped)} bad file(s):\n" + "".join(f"  {reason}\n" for reason in result.skipped),
              end="")
    return 0


def _check(args) -> int:
    from partialfc.data.tools import check_dataset
    report = check_dataset(args.path, decode=not args.no_decode, workers=args.workers)
    lo, hi = report.label_range
    print(f"{report.rec_path} ({report.flavour} flavour)\nimages: {report.num_images}\n"
          f"classes: {report.num_classes}\nlabels: {lo}..{hi}")
    for _, reason in report.bad_records:
        print(f"  bad: {reason}")
    if report.bad_records:
        print(f"{len(report.bad_records)} bad record(s)")
        return 1
    return 0


def _shuffle(args) -> int:
    from partialfc.data.tools import shuffle_dataset
    n = shuffle_dataset(args.src, args.out_prefix, args.seed)
    print(f"wrote {n} images in random order to {args.out_prefix}.rec/.idx")
    return 0


def _synth(args) -> int:
    from partialfc.data.synthetic import write_synthetic_dataset
    result = write_synthetic_dataset(args.out_prefix, args.identities, args.images_per_identity,
                                     args.verification_identities, args.verification_pairs, args.seed,
                                     args.quality, args.shuffle, args.workers)
    print(f"wrote {result.num_images} images of {result.num_classes} identities to {result.rec_path}"
          + (f", {result.num_pairs} verification pairs to {result.bin_path}" if result.bin_path else ""))
    return 0


def _index(args) -> int:
    from partialfc.data.tools import write_dali_index
    print(f"wrote {write_dali_index(args.path, args.out)} (image records only, for DALI)")
    return 0


def _make_bin(args) -> int:
    from partialfc.data.verification_bin import make_bin
    n = make_bin(args.images_dir, args.pairs, args.out)
    print(f"wrote {n} pairs to {args.out}")
    return 0


def add_commands(subparsers) -> None:
    add_align_commands(subparsers)
    add_prepare_command(subparsers)
    p = subparsers.add_parser("make-bin", help="a .bin verification set from an image folder and an LFW pairs.txt")
    p.add_argument("images_dir", help="folder of IMAGES_DIR/<name>/<name>_<NNNN>.jpg")
    p.add_argument("pairs", help="LFW pairs.txt: 'name i j' (same) or 'name1 i name2 j' (different) per line")
    p.add_argument("out", help="output .bin file")
    p.set_defaults(func=_make_bin)

    p = subparsers.add_parser("pack", help="pack SRC_DIR/<identity>/<images> into OUT_PREFIX.rec/.idx")
    p.add_argument("src_dir", help="folder of SRC_DIR/<identity>/<image files>")
    p.add_argument("out_prefix", help="writes OUT_PREFIX.rec and OUT_PREFIX.idx")
    p.add_argument("--size", type=int, default=112, help="resize to SIZE x SIZE (0: keep the size)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    p.add_argument("--workers", type=int, default=None, help="processes that decode/encode images (default: the CPU cores this process may use)")
    p.add_argument("--skip-bad", action="store_true", help="leave out files that cannot be decoded (listed at the end)")
    p.set_defaults(func=_pack)

    p = subparsers.add_parser("check", help="count images/classes, label range, list corrupt or truncated records")
    p.add_argument("path", help="the .rec file or its prefix")
    p.add_argument("--no-decode", action="store_true", help="check the container and labels only")
    p.add_argument("--workers", type=int, default=None, help="processes that decode/encode images (default: the CPU cores this process may use)")
    p.set_defaults(func=_check)

    p = subparsers.add_parser("shuffle", help="rewrite the image records in random order (plain flavour)")
    p.add_argument("src", help="the .rec file or its prefix")
    p.add_argument("out_prefix", help="writes OUT_PREFIX.rec and OUT_PREFIX.idx")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutation")
    p.set_defaults(func=_shuffle)

    p = subparsers.add_parser("synth", help="write a learnable synthetic identity dataset and a verification .bin")
    p.add_argument("out_prefix", help="writes OUT_PREFIX.rec/.idx and OUT_PREFIX.bin")
    p.add_argument("--identities", type=int, default=1000, help="training identities")
    p.add_argument("--images-per-identity", type=int, default=20, help="training images per identity")
    p.add_argument("--verification-identities", type=int, default=100,
                   help="further identities, held out, for the verification pairs")
    p.add_argument("--verification-pairs", type=int, default=1000, help="0: no .bin")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated faces")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--shuffle", action="store_true", help="random record order (plain flavour), for DALI")
    p.add_argument("--workers", type=int, default=None, help="processes that decode/encode images (default: the CPU cores this process may use)")
    p.set_defaults(func=_synth)

    p = subparsers.add_parser("index", help="write the index DALI needs (image records only)")
    p.add_argument("path", help="the .rec file or its prefix")
    p.add_argument("--out", default=None, help="default: PREFIX.dali.idx")
    p.set_defaults(func=_index)


def align_options(args):
    """The :class:`AlignOptions` of the options :func:`add_align_arguments` added."""
    from partialfc.align.pipeline import AlignOptions
    model = (("model", args.detector_model),) if args.detector_model else ()
    return AlignOptions(detector=args.detector, detector_options=model,
                        landmarks=args.landmarks, select=args.select, min_face=args.min_face, quality=args.quality)


def _print_align_report(report, sheet) -> None:
    import os

    from partialfc.align.pipeline import JOURNAL
    from partialfc.align.report import summary_table
    print(summary_table(report))
    for key, reason in report.skipped_photos[:20]:  # a name that is not UTF-8 prints with U+FFFD
        print(f"  skipped {key.encode('utf-8', 'surrogateescape').decode('utf-8', 'replace')}: {reason}")
    if len(report.skipped_photos) > 20:
        print(f"  ... {len(report.skipped_photos) - 20} more in {os.path.join(report.out_dir, JOURNAL)}")
    if sheet:
        print(f"contact sheet: {sheet}")


def _align(args) -> int:
    from partialfc.align.pipeline import align_folder
    from partialfc.align.report import contact_sheet
    report = align_folder(args.src, args.out, align_options(args), args.workers, progress=not args.no_progress,
                          retry_skipped=args.retry_skipped)
    _print_align_report(report, contact_sheet(args.out, args.contact_sheet) if args.contact_sheet else None)
    return 0


def add_align_arguments(p) -> None:
    """The options of face detection and alignment (``data align``, ``data prepare``, ``eval verify``)."""
    p.add_argument("--detector", default="mtcnn",
                   help="mtcnn | dlib | onnx (an SCRFD-layout model file: --detector-model)")
    p.add_argument("--detector-model", default=None, help="the detector's model file (onnx: required; dlib: the "
                                                          "68-point predictor, default Debian's libdlib-data)")
    p.add_argument("--landmarks", default=None, help="file of 'path x1 y1 ... x5 y5' lines: these points, no detection")
    p.add_argument("--select", default="largest", choices=["largest", "central"],
                   help="which face of a photo with several")
    p.add_argument("--min-face", type=int, default=32, help="skip faces whose box is smaller (pixels)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the crops")


def add_align_commands(subparsers) -> None:
    p = subparsers.add_parser("align", help="detect, five-point align and crop every photo to 112x112")
    p.add_argument("src", help="folder of SRC/<identity>/<photos>, or a list file of 'path label' lines")
    p.add_argument("out", help="writes OUT/<identity>/<photo>.jpg, OUT/align.tsv and OUT/contact_sheet.png")
    add_align_arguments(p)
    p.add_argument("--workers", type=int, default=None, help="processes (default: the CPU cores this process may use)")
    p.add_argument("--contact-sheet", type=int, default=48, help="faces on the contact sheet (0: none)")
    p.add_argument("--retry-skipped", action="store_true",
                   help="try again the photos an earlier run skipped (a re-run otherwise resumes where it stopped)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_align)


def _prepare(args) -> int:
    import shlex

    from partialfc.align.prepare import prepare_photos
    from partialfc.align.report import contact_sheet
    result = prepare_photos(args.raw, args.out, align_options(args), args.val_identities, args.pairs, args.seed,
                            args.workers, progress=not args.no_progress)
    _print_align_report(result.align, contact_sheet(f"{args.out}/aligned"))
    print(f"training set: {result.train_images} faces of {result.train_identities} identities in "
          f"{result.train_prefix}.rec/.idx")
    command = ["partialfc", "train", "photos", f"data.rec={result.train_prefix}",
               f"eval.bins=[{result.val_bin or ''}]"]
    if result.val_bin:
        print(f"held out: {result.val_pairs} pairs of {len(result.val_identities)} identities in {result.val_bin}")
    print("train on it with:\n  " + " ".join(shlex.quote(c) for c in command))
    return 0


def add_prepare_command(subparsers) -> None:
    p = subparsers.add_parser("prepare", help="raw photos to an aligned, shuffled .rec/.idx and a held-out .bin")
    p.add_argument("raw", help="folder of RAW/<identity>/<photos>, or a list file of 'path label' lines")
    p.add_argument("out", help="writes OUT/aligned/, OUT/train.rec/.idx/.names and OUT/val.bin")
    add_align_arguments(p)
    p.add_argument("--val-identities", type=int, default=10, help="identities held out for the .bin (0: none)")
    p.add_argument("--pairs", type=int, default=1000, help="verification pairs of the held-out identities")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out choice, the pairs and the shuffle")
    p.add_argument("--workers", type=int, default=None, help="processes (default: the CPU cores this process may use)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_prepare)
