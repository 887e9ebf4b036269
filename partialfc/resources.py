"""Files shipped inside the package: the training configs (``partialfc/configs``) and the
Slurm templates (``partialfc/slurm``). In a clone they are links to the top-level ``configs/``
and ``slurm/``; a wheel carries copies, so ``partialfc train demo`` works after a plain install.
"""

from __future__ import annotations

import os
from pathlib import Path

from partialfc.errors import ConfigError

PACKAGE = Path(__file__).resolve().parent
CONFIGS = PACKAGE / "configs"
SLURM = PACKAGE / "slurm"


def packaged_configs() -> list[str]:
    """Names of the packaged configs (``demo``, ``ms1mv3_r50_arcface``, ...), sorted."""
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def resolve_config(name: str) -> str:
    """``name`` when it is a path (an existing file, or anything with a directory part or a
    ``.yaml``/``.yml`` suffix); otherwise the packaged ``configs/<name>.yaml``. A bare name
    that is neither is a :class:`ConfigError` listing the packaged configs."""
    if os.path.exists(name) or os.sep in name or Path(name).suffix in (".yaml", ".yml"):
        return name
    packaged = CONFIGS / f"{name}.yaml"
    if not packaged.is_file():
        raise ConfigError(f"no config file {name!r} and no packaged config of that name; "
                          f"packaged: {', '.join(packaged_configs())}")
    return str(packaged)
