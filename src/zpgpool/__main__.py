"""``python -m zpgpool``: the ``zpgpool`` command (see zpgpool.cli)."""
import sys

from zpgpool.cli import main


if __name__ == "__main__":
    sys.exit(main())
