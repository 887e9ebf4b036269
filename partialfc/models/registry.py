"""Choose a backbone by name from configuration: ``build_backbone("iresnet50", 512)``.

Each backbone registers itself where it is defined: a small builder function per variant,
``@register_backbone("name", *aliases)`` over ``def name(embedding_size=..., **kw) -> nn.Module``;
importing :mod:`partialfc.models` imports every backbone module, so the table is complete.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Callable

from torch import nn

Builder = Callable[..., nn.Module]
BACKBONES: dict[str, Builder] = {}


def register_backbone(name: str, *aliases: str) -> Callable[[Builder], Builder]:
    """Function decorator: make ``builder(embedding_size=..., **kw)`` buildable as
    ``build_backbone(name, ...)`` and under each of ``aliases``."""
    def register(builder: Builder) -> Builder:
        for key in (name, *aliases):
            if key in BACKBONES:
                raise ValueError(f"backbone name {key!r} is already registered to {BACKBONES[key].__name__}")
        BACKBONES.update(dict.fromkeys((name, *aliases), builder))
        return builder
    return register


def list_backbones(filter: str = "") -> list[str]:
    """The registered names (aliases included), sorted; ``filter``: only those matching the
    shell-style pattern (``"iresnet*"``, ``"vit_?"``)."""
    return sorted(n for n in BACKBONES if not filter or fnmatchcase(n, filter))


def build_backbone(name: str, embedding_size: int = 512, **kwargs) -> nn.Module:
    """Instantiate the backbone registered as ``name``; ``kwargs`` go to its constructor
    (e.g. ``dropout``, ``gradient_checkpointing``). Unknown names or options raise
    ``ValueError`` listing what is valid."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    try:
        return BACKBONES[name](embedding_size=embedding_size, **kwargs)
    except TypeError as err:
        raise ValueError(f"invalid options {sorted(kwargs)} for backbone {name!r}: {err}") from err
