"""finetune-operator's trainer: prepare → fine-tune → export GGUF → (evaluate) → upload.

One folder per stage (data/, train/, export/, evaluation/, upload/) and two that every stage uses
(storage/: S3 and its caches; reporting/: the status and the training log). Each stage is a command
of the `finetune` CLI (cli.py) and a function of pipeline.py; train/recipe.py is the training loop.
See cli.py for usage.
"""

import os as _os

# The environment as the pod started the trainer, before any library (Unsloth, Triton, Inductor) set
# its own variables in-process: the compile-cache key reads its switches from here (train/compile_cache.py).
STARTUP_ENV = dict(_os.environ)
