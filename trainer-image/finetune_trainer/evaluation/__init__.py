"""Evaluate exported GGUF files with lm-evaluation-harness, in process through llama.cpp.

    from finetune_trainer.evaluation import run_eval
    metrics = run_eval({"f16": f16_path, "q4_k_m": q4_path}, spec.evaluation, workdir)

The command line is `finetune eval` (cli.py). Importing this package is cheap: lm-eval and
llama-cpp-python load on the first evaluation.
"""

from .runner import run_eval, select_models

__all__ = ["run_eval", "select_models"]
