"""``python -m ddpm`` is the ``ddpm`` command (and what ``torchrun -m ddpm`` runs)."""

import sys

from ddpm.cli import main

sys.exit(main())
