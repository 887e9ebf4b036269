"""Reading ``torch.save`` files that came from disk: checkpoints, exported backbones and
insightface weights. Every one loads with ``torch.load(weights_only=True)`` (tensors and plain
Python values; no code from the file runs), and whatever goes wrong is a
:class:`~partialfc.errors.CheckpointError` of one line naming the file.
"""

from __future__ import annotations

import os
import pickle

import torch

from partialfc.errors import CheckpointError


def _first_line(err: BaseException, key: str = "") -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    picked = [line for line in lines if key and key in line] or lines
    return picked[0] if picked else type(err).__name__


def load_plain(path: str | os.PathLike, what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)`` on the CPU; :class:`CheckpointError` naming
    ``path`` (``what`` says which kind of file) if it is missing, damaged or holds more than
    tensors and plain values."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} not found") from None
    except pickle.UnpicklingError as err:  # torch's message suggests weights_only=False: never for these
        raise CheckpointError(f"cannot read {what} {path}: it holds more than tensors and plain values "
                              f"({_first_line(err, 'GLOBAL')})") from None
    except Exception as err:  # damaged bytes (truncated zip, bad records): whatever torch raises
        raise CheckpointError(f"cannot read {what} {path}: {_first_line(err)}") from None
