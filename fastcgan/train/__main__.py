"""``python -m fastcgan.train`` (also what ``torchrun -m fastcgan.train`` runs in each process)."""

from fastcgan.train.cli import console_main

console_main()
