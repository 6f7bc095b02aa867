"""``python -m mmtl.cli``: the same as the ``mmtl`` console script."""
import sys

from mmtl.cli import app

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
