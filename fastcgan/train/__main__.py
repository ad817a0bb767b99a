"""``python -m fastcgan.train`` (also what ``torchrun -m fastcgan.train`` runs in each process)."""

from fastcgan.train.cli import exit_after, main

exit_after(main())
