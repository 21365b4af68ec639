"""`python -m finetune_mcp` is `finetune-mcp`."""

import sys

from .cli import main

sys.exit(main())
