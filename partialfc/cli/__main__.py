"""``python -m partialfc.cli``: the ``partialfc`` command."""

import sys

from partialfc.cli import main

sys.exit(main())
