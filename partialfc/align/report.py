"""What ``data align`` shows at its end: the summary table and a contact sheet of aligned faces
with their five points, because alignment is checked by looking."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from partialfc.align.pipeline import CONTACT_SHEET, AlignReport, read_journal
from partialfc.align.template import ARCFACE_TEMPLATE, apply_transform, similarity_transform


def summary_table(report: AlignReport) -> str:
    """The summary as a plain-text table (what, count)."""
    rows = report.rows()
    width = max(len(what) for what, _ in rows)
    return "\n".join(f"  {what:<{width}}  {count:>8}" for what, count in rows)


def contact_sheet(out_dir: str, faces: int = 48, columns: int = 8, seed: int = 0) -> str | None:
    """Write ``OUT/contact_sheet.png``: a random sample of ``faces`` aligned crops of the
    journal, each with its five points as mapped into the crop (red) over the template's
    (green); returns its path, or None when nothing is aligned."""
    aligned = [(os.path.join(out_dir, crop), detail) for status, crop, detail in read_journal(out_dir).values()
               if status == "aligned" and os.path.isfile(os.path.join(out_dir, crop))]
    if not aligned:
        return None
    rng = np.random.default_rng(seed)
    chosen = [aligned[i] for i in sorted(rng.choice(len(aligned), min(faces, len(aligned)), replace=False))]
    cell, rows = 2 * 112, -(-len(chosen) // columns)
    sheet = Image.new("RGB", (columns * cell, rows * cell), (40, 40, 40))
    for i, (crop_path, detail) in enumerate(chosen):
        with Image.open(crop_path) as im:
            tile = im.convert("RGB").resize((cell, cell), Image.BILINEAR)
        points = np.array(detail.split()[:10], np.float64).reshape(5, 2)
        mapped = apply_transform(similarity_transform(points, ARCFACE_TEMPLATE), points)
        draw = ImageDraw.Draw(tile)
        for (tx, ty), (x, y) in zip(ARCFACE_TEMPLATE * 2, mapped * 2):
            draw.line([(tx - 4, ty), (tx + 4, ty)], fill=(0, 255, 0))
            draw.line([(tx, ty - 4), (tx, ty + 4)], fill=(0, 255, 0))
            draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=(255, 40, 40))
        sheet.paste(tile, ((i % columns) * cell, (i // columns) * cell))
    path = os.path.join(out_dir, CONTACT_SHEET)
    sheet.save(path)
    return path
