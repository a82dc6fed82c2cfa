"""``python -m qdlib.cli``: the same as the ``qd`` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
