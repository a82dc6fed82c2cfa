"""``python -m qdlib.cli``: the same as the ``qd`` command."""

import sys

from . import main

sys.exit(main())
