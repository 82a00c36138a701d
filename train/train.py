"""``python train/train.py ARGS`` (or ``torchrun --nproc_per_node N train/train.py ARGS``) is
``hrm train ARGS``; the loop lives in :mod:`hrm.training` so that an installed ``hrm`` works
from any directory."""

import sys

from hrm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
