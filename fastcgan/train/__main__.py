"""``python -m fastcgan.train``."""

import sys

from fastcgan.train.cli import main

sys.exit(main())
