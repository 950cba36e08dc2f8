"""`python -m train` / `accelerate launch -m train` / `torchrun -m train`: see train/cli.py."""

import sys

from train.cli import main

sys.exit(main(sys.argv[1:]))
