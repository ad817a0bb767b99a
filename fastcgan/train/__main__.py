"""``python -m fastcgan.train`` (also what ``torchrun -m fastcgan.train`` runs in each process)."""

import sys

from fastcgan._cli import train_command

sys.exit(train_command())
