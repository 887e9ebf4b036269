"""The unaligned twin of a ``data prepare`` output: the same training identities and the same
held-out pairs (``OUT/val_pairs.tsv``), but each whole photo resized to 112x112 instead of its
aligned face. ``python unaligned_twin.py PHOTOS PREPARED OUT`` writes OUT/train.rec/.idx and
OUT/val.bin. For benchmarks/align_ablation.sh."""

import os
import sys
from pathlib import Path

from PIL import Image

from partialfc.data.images import encode_jpeg
from partialfc.data.tools import list_image_folders, pack_identities, shuffle_dataset
from partialfc.data.verification_bin import write_bin

photos, prepared, out = sys.argv[1:4]
os.makedirs(out, exist_ok=True)


def whole_photo(crop: str) -> bytes:
    """The photo a crop came from (same folder and stem), resized to 112x112 as data pack does."""
    folder, name = crop.split("/", 1)
    source = next(Path(photos, folder).glob(Path(name).stem + ".*"))
    with Image.open(source) as im:
        return encode_jpeg(im.convert("RGB").resize((112, 112), Image.BILINEAR), 95)


pairs = [line.split("\t") for line in Path(prepared, "val_pairs.tsv").read_text().splitlines()]
write_bin(f"{out}/val.bin", [whole_photo(p) for a, b, _ in pairs for p in (a, b)], [s == "1" for *_, s in pairs])
train = set(Path(prepared, "train.names").read_text().split())
pack_identities([(name, files) for name, files in list_image_folders(photos) if name in train],
                f"{out}/train.sorted", size=112, progress=False)
shuffle_dataset(f"{out}/train.sorted", f"{out}/train", 0, progress=False)
for leftover in Path(out).glob("train.sorted.*"):
    leftover.unlink()
print(f"{len(pairs)} pairs, {len(train)} training identities")
