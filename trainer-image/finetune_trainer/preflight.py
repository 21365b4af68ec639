"""Checks that fail a run in its first seconds instead of after the GPU hours: whatever only the model
or the evaluation harness can tell (the schema and the operator caught the rest before the pod).

Each failure is a ConfigError (exit 42): the Job fails at once, with no retry.
"""

from __future__ import annotations

import logging
from pathlib import Path

from finetune_api.spec import EvaluationSpec

from .errors import ConfigError
from .train.model_loading import BaseModel

log = logging.getLogger(__name__)


def model_module_names(base: BaseModel) -> set[str]:
    """Every module name of the model, built from its config on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base.source, revision=base.revision)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError("ModelNotFound", f"{base.source}: cannot read the model config: {exc}") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name for name, _ in model.named_modules() if name}


def check_target_modules(base: BaseModel, targets: list[str]) -> None:
    names = model_module_names(base)
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n in names if n.rsplit(".", 1)[-1].endswith("proj")})
        raise ConfigError("InvalidSpec", f"spec.training.lora.targetModules: {', '.join(missing)} not in "
                                         f"{base.source} (its projections: {', '.join(linear) or 'none'})")


def check_eval_tasks(spec: EvaluationSpec, workdir: Path, store=None) -> None:
    """Every task name resolves in lm-eval (built in, or in the offline folder of evaluation.dataUri)."""
    from lm_eval.tasks import TaskManager

    from .evaluation.data import resolve_task_dir
    from .evaluation.runner import _task_manager

    task_dir = resolve_task_dir(spec.data_uri, workdir, store)
    manager = _task_manager(TaskManager, task_dir, list(spec.tasks))
    unknown = [t for t in spec.tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError("UnknownTask", f"spec.evaluation.tasks: {', '.join(unknown)} "
                                         f"{'is' if len(unknown) == 1 else 'are'} not lm-eval tasks"
                                         + (" (nor in evaluation.dataUri)" if spec.data_uri else ""))
