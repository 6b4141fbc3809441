"""``python -m grad_callbacks``: the ``grad-audit`` command line tool."""

import sys

from grad_callbacks.cli import main

if __name__ == "__main__":
    sys.exit(main())
