"""finetune-operator's trainer: prepare → fine-tune → export GGUF → (evaluate) → upload.

Each stage is a command of the `finetune` CLI (cli.py) and a function of pipeline.py; recipe.py is the
training loop. See cli.py for usage.
"""
