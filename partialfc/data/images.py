"""Image encode/decode with Pillow (the reference decoder of the PyTorch loader and the tools)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from partialfc.errors import RecordIOError

IMAGE_SIZE = 112  # training images are aligned IMAGE_SIZE x IMAGE_SIZE face crops


def decode_image(data: bytes) -> np.ndarray:
    """Decode JPEG/PNG bytes to uint8 RGB ``(H, W, 3)``; raises ``OSError``/``ValueError`` on
    corrupt data (the whole image is decoded, so truncated JPEGs fail too)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im.convert("RGB"))


def decode_face(data: bytes, where: str) -> np.ndarray:
    """Decode a training image as the loaders and ``data check`` do: uint8 RGB
    ``(IMAGE_SIZE, IMAGE_SIZE, 3)``, else :class:`RecordIOError` starting with ``where``."""
    try:
        image = decode_image(data)
    except UnidentifiedImageError:
        raise RecordIOError(f"{where}: image cannot be decoded (not an image format Pillow knows)") from None
    except (OSError, ValueError, SyntaxError) as e:  # Pillow's errors for corrupt data
        raise RecordIOError(f"{where}: image cannot be decoded ({e})") from None
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise RecordIOError(f"{where}: image is {image.shape[1]}x{image.shape[0]}, expected "
                            f"{IMAGE_SIZE}x{IMAGE_SIZE} (aligned face crops)")
    return image


def encode_jpeg(image: np.ndarray | Image.Image, quality: int = 90) -> bytes:
    """Encode uint8 RGB ``(H, W, 3)`` (or a PIL image) as baseline JPEG bytes."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
