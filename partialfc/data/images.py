"""Image encode/decode with Pillow (the reference decoder of the PyTorch loader and the tools)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode_image(data: bytes) -> np.ndarray:
    """Decode JPEG/PNG bytes to uint8 RGB ``(H, W, 3)``; raises ``OSError``/``ValueError`` on
    corrupt data (the whole image is decoded, so truncated JPEGs fail too)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im.convert("RGB"))


def encode_jpeg(image: np.ndarray | Image.Image, quality: int = 90) -> bytes:
    """Encode uint8 RGB ``(H, W, 3)`` (or a PIL image) as baseline JPEG bytes."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
