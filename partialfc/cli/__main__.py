"""``python -m partialfc.cli``: the ``partialfc`` command."""

from partialfc.cli import entry

entry()
