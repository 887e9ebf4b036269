"""Choose a loss by name from configuration: ``build_loss("arcface", s=64, m=0.5)``.

Each loss class registers itself where it is defined with ``@register_loss("name")``;
importing :mod:`partialfc.losses` imports every loss module, so the table is complete.
"""

from __future__ import annotations

import inspect
from typing import Callable

from partialfc.losses.base import MarginLoss

LOSSES: dict[str, type[MarginLoss]] = {}


def register_loss(name: str) -> Callable[[type[MarginLoss]], type[MarginLoss]]:
    """Class decorator: make the class buildable as ``build_loss(name, ...)``."""
    def register(cls: type[MarginLoss]) -> type[MarginLoss]:
        if name in LOSSES:
            raise ValueError(f"loss name {name!r} is already registered to {LOSSES[name].__name__}")
        LOSSES[name] = cls
        return cls
    return register


def _own_parameters(klass: type) -> tuple[list[str], bool]:
    params = inspect.signature(klass.__init__).parameters.values()
    named = [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return named, any(p.kind == p.VAR_KEYWORD for p in params)


def loss_parameters(cls: type[MarginLoss]) -> list[str]:
    """Names of the keyword parameters a loss class accepts.

    Convention: a loss's ``__init__`` names its own parameters and forwards ``**kwargs``
    to :class:`MarginLoss` (``gradient``, ``inter_threshold``), so those are added; the
    parameters of intermediate classes (e.g. CombinedMargin's m1 for ArcFace) are not."""
    names, forwards = _own_parameters(cls)
    if forwards and cls is not MarginLoss:
        names += [n for n in _own_parameters(MarginLoss)[0] if n not in names]
    return names


def build_loss(name: str, **params) -> MarginLoss:
    """Instantiate the loss registered as ``name`` (case-insensitive, ``-`` = ``_``) with ``params``.

    Raises ``ValueError`` listing the valid names, or the valid parameters of that loss;
    an invalid value raises the loss's own ``ValueError`` naming the parameter and its range."""
    key = name.lower().replace("-", "_")
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(sorted(LOSSES))}")
    cls = LOSSES[key]
    valid = loss_parameters(cls)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"loss {key!r} has no parameter(s) {', '.join(unknown)}; "
                         f"valid parameters: {', '.join(valid)}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid parameters for loss {key!r}: {err}; "
                         f"valid parameters: {', '.join(valid)}") from err
