"""``python -m vit_repro.bench``: the same as ``vit-repro bench``."""

import sys

from . import main

sys.exit(main())
