"""What the source-walking tests share."""

from __future__ import annotations

import ast


def import_base(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a ``from ... import`` in ``package`` imports from (``from . import
    x`` and ``from ..a import x`` resolved against ``package``)."""
    base = node.module or ""
    if node.level:
        anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        base = ".".join([*anchor, *([base] if base else [])])
    return base
