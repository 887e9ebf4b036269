"""The base of every closed set of string options (config fields, the head's implementations)."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A closed set of string options; define members as ``name = "name"`` (OmegaConf matches a
    config value against the member names). Members compare, hash and print as their value."""

    def __str__(self) -> str:
        return self.value
