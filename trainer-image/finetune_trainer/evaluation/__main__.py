"""python -m finetune_trainer.evaluation ...: the same as `finetune eval ...` (cli.py)."""

import sys

from ..cli import main

sys.exit(main(["eval", *sys.argv[1:]]))
