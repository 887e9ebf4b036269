"""Optional dependencies (the ``pyproject.toml`` extras): import one, or fail with one line
saying which extra installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from partialfc.errors import ConfigError

# module -> the pip requirement that provides it
EXTRAS = {
    "nvidia.dali": "'partialfc[dali]' (CUDA 13; 'partialfc[dali-cuda12]' for CUDA 12 drivers)",
    "deepspeed": "'partialfc[deepspeed]'",
    "wandb": "'partialfc[wandb]'",
    "onnxruntime": "'partialfc[onnx]'",
    "dlib": "'partialfc[align]' (and Debian's libdlib-data for the landmark model)",
}


def require(module: str, feature: str) -> ModuleType:
    """``module`` imported; a :class:`ConfigError` naming ``feature`` (what asked for it, e.g.
    ``data.loader=dali``) and the extra to install when it cannot be imported."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"{feature} needs {module}, which cannot be imported ({err}); "
                          f"install it with: pip install {EXTRAS[module]}") from None
