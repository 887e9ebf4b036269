"""Verification sets in the InsightFace ``.bin`` format (LFW, CFP-FP, AgeDB-30, ...).

A ``.bin`` is a pickle of ``(bins, issame_list)``: ``bins`` holds ``2 * P`` encoded images
(JPEG/PNG bytes, or uint8 numpy arrays of those bytes), pairwise consecutive; ``issame_list``
holds ``P`` booleans (or a bool array). Old files are Python-2 pickles, hence ``encoding="bytes"``.

The files come from elsewhere, so they are read with :class:`SafeUnpickler`, which runs no
code from the file: it rebuilds bytes, lists, tuples, ints, booleans and 1-D uint8/bool numpy
arrays and nothing else; any other content is a :class:`VerificationBinError` naming the file.
"""

from __future__ import annotations

import os
import pickle
from typing import Sequence

import numpy as np

from partialfc.data.images import decode_image
from partialfc.errors import InputNotFoundError, VerificationBinError

_DTYPES = {"u1": np.uint8, "b1": np.bool_, "?": np.bool_}
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric",
                  "numpy")


def _text(value) -> str:
    if isinstance(value, bytes):  # Python 2 str under encoding="bytes"
        value = value.decode("latin1")
    if not isinstance(value, str):
        raise pickle.UnpicklingError(f"expected a string, got {type(value).__name__}")
    return value


def _raw(value) -> bytes:
    if isinstance(value, str):  # a Python 2 pickle read as latin1
        value = value.encode("latin1")
    if not isinstance(value, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"expected array data as bytes, got {type(value).__name__}")
    return bytes(value)


class _Inert:
    """Base of every object the unpickler hands to the pickle: a BUILD on it is refused unless
    the subclass accepts it, so no file can set attributes on anything."""

    __slots__ = ()

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"unexpected state for {type(self).__name__}")


class _DType(_Inert):
    """``numpy.dtype(name, align, copy)`` restricted to uint8 and bool."""

    __slots__ = ("type",)

    def __init__(self, name, *flags):
        name = _text(name)
        if name not in _DTYPES:
            raise pickle.UnpicklingError(f"numpy dtype {name!r} (only uint8 and bool)")
        self.type = _DTYPES[name]

    def __setstate__(self, state):  # byte order, field names, ...: fixed for these dtypes
        if not isinstance(state, tuple):
            raise pickle.UnpicklingError("unexpected dtype state")


class _Array(_Inert):
    """A 1-D uint8/bool array, from ``_reconstruct`` + BUILD or from ``_frombuffer``."""

    __slots__ = ("value",)

    def __init__(self, value: np.ndarray | None = None):
        self.value = value

    def __setstate__(self, state):
        if self.value is not None or not isinstance(state, tuple) or len(state) != 5:
            raise pickle.UnpicklingError("unexpected array state")
        _, shape, dtype, _, raw = state
        self.value = _array(_raw(raw), dtype, shape)


def _array(raw: bytes, dtype, shape) -> np.ndarray:
    if not isinstance(dtype, _DType):
        raise pickle.UnpicklingError("array of an unknown dtype")
    if not (isinstance(shape, tuple) and len(shape) <= 1 and all(type(n) is int for n in shape)):
        raise pickle.UnpicklingError(f"array of shape {shape!r} (only 1-D)")
    if (shape[0] if shape else 1) != len(raw):
        raise pickle.UnpicklingError(f"array of shape {shape} holds {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype.type).reshape(shape).copy()


class _Constructor(_Inert):
    """One allowed global, callable from the pickle."""

    __slots__ = ("name", "fn")

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __call__(self, *args):
        return self.fn(*args)


def _reconstruct(cls, shape, typecode):
    if not isinstance(cls, _Constructor) or cls.name != "ndarray":
        raise pickle.UnpicklingError("_reconstruct of something other than numpy.ndarray")
    return _Array()


def _scalar(dtype, raw):
    return _array(_raw(raw), dtype, ()).item()


def _frombuffer(buffer, dtype, shape, order="C"):
    return _Array(_array(_raw(buffer), dtype, shape))


def _encode(text, encoding):  # how protocol-2 pickles of Python 3 spell bytes
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode other than of text to latin1")
    return text.encode("latin1")


_GLOBALS = {"_reconstruct": _reconstruct, "scalar": _scalar, "_frombuffer": _frombuffer, "dtype": _DType,
            "ndarray": None}


class SafeUnpickler(pickle.Unpickler):
    """Builds what pickle's opcodes build (bytes, str, numbers, lists, tuples, dicts) and 1-D
    uint8/bool numpy arrays (as :class:`_Array`); every other global is refused, so no code
    from the file runs."""

    def find_class(self, module: str, name: str):
        if module in _NUMPY_MODULES and name in _GLOBALS:
            return _Constructor(name, _GLOBALS[name])
        if (module, name) == ("_codecs", "encode"):
            return _Constructor(name, _encode)
        raise pickle.UnpicklingError(f"it refers to {module}.{name} (a .bin holds only bytes, booleans and "
                                     "uint8/bool arrays)")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent references are not allowed")


def _image(value) -> bytes:
    if isinstance(value, _Array) and value.value is not None and value.value.dtype == np.uint8:
        return value.value.tobytes()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise ValueError(f"an image is a {type(value).__name__}, not bytes")


def _issame(value) -> np.ndarray:
    if isinstance(value, _Array) and value.value is not None and value.value.dtype == np.bool_:
        return value.value.copy()
    if isinstance(value, (list, tuple)) and all(type(v) is bool or (type(v) is int and v in (0, 1)) for v in value):
        return np.array(value, dtype=bool).reshape(-1)
    raise ValueError("the pair labels are not a list of booleans")


def _parse(file) -> tuple[list[bytes], np.ndarray]:
    content = SafeUnpickler(file, encoding="bytes").load()
    if not (isinstance(content, (tuple, list)) and len(content) == 2 and isinstance(content[0], (list, tuple))):
        raise ValueError("it is not a pair (images, pair labels)")
    return [_image(b) for b in content[0]], _issame(content[1])


def write_bin(path: str | os.PathLike, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write ``2 * len(issame)`` encoded images and the pair labels, atomically."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs (need 2 per pair)")
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(([bytes(b) for b in images], [bool(s) for s in issame]), f, protocol=4)
    os.replace(tmp, path)


def read_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """``(encoded images (2P), issame bool (P,))`` from a ``.bin`` file (Python 2 or 3 pickle)."""
    if not os.path.isfile(path):
        raise InputNotFoundError(f"verification set {path} not found")
    try:
        with open(path, "rb") as f:
            images, issame = _parse(f)
    except Exception as err:  # untrusted bytes: whatever they make the unpickler raise
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise VerificationBinError(f"{path} is not a verification set: {detail}") from None
    if len(images) != 2 * len(issame):
        raise VerificationBinError(f"{path}: {len(images)} images for {len(issame)} pairs (need 2 per pair)")
    return images, issame


def load_bin_images(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Decoded pairs: uint8 ``(2P, 3, H, W)`` RGB and issame bool ``(P,)``."""
    images, issame = read_bin(path)
    decoded = []
    for i, data in enumerate(images):
        try:
            decoded.append(decode_image(data))
        except (OSError, ValueError) as e:
            raise VerificationBinError(f"{path}: image {i} (pair {i // 2}) cannot be decoded: {e}") from None
    return np.stack(decoded).transpose(0, 3, 1, 2).copy(), issame


def read_lfw_pairs(images_dir: str | os.PathLike, pairs_txt: str | os.PathLike) -> tuple[list[str], list[bool]]:
    """Image paths ``(2P,)`` and issame ``(P,)`` of an LFW ``pairs.txt``: an optional header line
    (``folds pairs`` or one count), then ``name i j`` (same person) or ``name1 i name2 j``, image
    ``i`` of ``name`` being ``images_dir/name/name_000i.jpg``."""
    if not os.path.isfile(pairs_txt):
        raise InputNotFoundError(f"pairs file {pairs_txt} not found")
    paths, issame = [], []
    with open(pairs_txt) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields or (number == 1 and all(x.isdigit() for x in fields)):
                continue
            if len(fields) == 3:
                fields = [fields[0], fields[1], fields[0], fields[2]]
            elif len(fields) != 4:
                raise VerificationBinError(f"{pairs_txt}:{number}: expected 'name i j' or 'name1 i name2 j'")
            for name, index in (fields[:2], fields[2:]):
                paths.append(os.path.join(images_dir, name, f"{name}_{int(index):04d}.jpg"))
            issame.append(fields[0] == fields[2])
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise InputNotFoundError(f"{len(missing)} images of {pairs_txt} not found, e.g. {missing[0]}")
    return paths, issame


def make_bin(images_dir: str | os.PathLike, pairs_txt: str | os.PathLike, out: str | os.PathLike) -> int:
    """Write the pairs of an LFW ``pairs.txt`` as a ``.bin`` (the image files' bytes as they
    are); returns the number of pairs."""
    paths, issame = read_lfw_pairs(images_dir, pairs_txt)
    images = []
    for path in paths:
        with open(path, "rb") as f:
            images.append(f.read())
    write_bin(out, images, issame)
    return len(issame)
