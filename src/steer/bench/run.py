"""``python -m steer.bench.run CONFIG_OR_PRESET --db results.sqlite`` (also under ``torchrun``): see ``runner``."""

import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main())
