"""python -m finetune_trainer.evaluation --gguf f16=model-f16.gguf --tasks arc_easy --output eval/"""

import sys

from .runner import main

sys.exit(main())
