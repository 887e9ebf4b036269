"""Reading photos as they come from cameras and strangers: any format Pillow decodes, EXIF
orientation applied, CMYK, grayscale, palette and alpha made RGB, huge ones decoded at a
reduced size (JPEG's DCT scaling where it applies). A photo that cannot be used raises
:class:`PhotoSkipped` with a short reason, never a traceback."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
MAX_SIDE = 3000  # longest side a photo is decoded at: a 112 px crop needs far less


class PhotoSkipped(Exception):
    """A photo left out; ``reason`` is one of :data:`REASONS`' keys, ``detail`` says more."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


REASONS = {
    "not an image": "a file Pillow does not recognise as an image",
    "corrupt": "truncated or damaged image data",
    "too large": "more pixels than Pillow's decompression-bomb limit",
    "no face": "the detector found no face",
    "face too small": "every face found is smaller than --min-face",
    "no landmarks": "the --landmarks file has no line for the photo",
    "bad landmarks": "the --landmarks file's five points coincide or lie on a line (placeholders)",
    "unreadable": "the file cannot be read (permissions, I/O error)",
}


def load_photo(path: str | Path, max_side: int = MAX_SIDE) -> tuple[np.ndarray, float]:
    """``(uint8 RGB (H, W, 3) array, scale)``: the photo upright (EXIF orientation applied), with
    its longest side at most ``max_side``; ``scale`` = decoded size / stored size (1.0 unless
    it was reduced), so a point ``p`` of the upright full-size photo lies at
    ``(p + 0.5) * scale - 0.5`` (pixel centres at integer coordinates)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # past twice as many: an error
            with Image.open(path) as im:
                upright_size = _upright_size(im)
                if im.format == "JPEG" and max(im.size) > max_side:
                    factor = max(im.size) / max_side
                    im.draft("RGB", (int(im.size[0] / factor), int(im.size[1] / factor)))
                im.load()
                im = ImageOps.exif_transpose(im)
                im = _rgb(im)
    except Image.DecompressionBombError as err:
        raise PhotoSkipped("too large", str(err).split(".")[0]) from None
    except UnidentifiedImageError:
        raise PhotoSkipped("not an image") from None
    except (PermissionError, IsADirectoryError, FileNotFoundError) as err:
        raise PhotoSkipped("unreadable", err.strerror or str(err)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # Pillow's errors for damaged data
        raise PhotoSkipped("corrupt", str(err)) from None
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.BILINEAR, reducing_gap=2.0)
    return np.asarray(im), im.size[0] / upright_size[0]


def _upright_size(im: Image.Image) -> tuple[int, int]:
    """The stored size as the photo is shown: width and height swapped for the EXIF
    orientations that rotate by 90 degrees (5 to 8)."""
    orientation = im.getexif().get(0x0112, 1)
    return im.size[::-1] if orientation in (5, 6, 7, 8) else im.size


def _rgb(im: Image.Image) -> Image.Image:
    """RGB of any mode: alpha composited on white, 16-bit grayscale from 0..65535 to 0..255,
    32-bit and float grayscale rescaled (by their maximum when it exceeds 255)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(im, np.float64)
        top = values.max() if values.size and values.max() > 255 else 255.0
        if im.mode.startswith("I;16") or im.mode == "I" and 255 < top <= 65535:
            top = 65535.0  # 16-bit samples (older Pillow opens a 16-bit grayscale PNG as "I")
        im = Image.fromarray(np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8))
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")
