"""Choose a loss by name from configuration: ``build_loss("arcface", s=64, m=0.5)``."""

from __future__ import annotations

import inspect

from partialfc.losses.base import MarginLoss
from partialfc.losses.margins import ArcFace, CosFace, NormFace

LOSSES: dict[str, type[MarginLoss]] = {
    "normface": NormFace,
    "cosface": CosFace,
    "arcface": ArcFace,
}


def loss_parameters(cls: type[MarginLoss]) -> list[str]:
    """Names of the keyword parameters a loss class accepts (its own and the base's)."""
    names: list[str] = []
    for klass in cls.__mro__:
        if klass is object or not issubclass(klass, MarginLoss):
            continue
        for name, p in inspect.signature(klass.__init__).parameters.items():
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name not in names:
                names.append(name)
    return names


def build_loss(name: str, **params) -> MarginLoss:
    """Instantiate the loss registered as ``name`` (case-insensitive) with ``params``.

    Raises ``ValueError`` listing the valid names, or the valid parameters of that loss."""
    key = name.lower().replace("-", "_")
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(sorted(LOSSES))}")
    cls = LOSSES[key]
    valid = loss_parameters(cls)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"loss {key!r} has no parameter(s) {', '.join(unknown)}; "
                         f"valid parameters: {', '.join(valid)}")
    return cls(**params)
