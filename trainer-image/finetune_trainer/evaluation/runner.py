"""run_eval: every selected GGUF file through lm-evaluation-harness, then eval.json and eval.md.

    finetune eval --gguf f16=out/model-f16.gguf --gguf q4_k_m=out/model-q4_k_m.gguf \\
        --tasks arc_easy,hellaswag --limit 200 --output-dir out/eval      (cli.py)

One GGUF at a time is loaded (in process, through llama.cpp), evaluated on every task, and freed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from finetune_api.spec import EvaluationSpec
from finetune_api.status import Reason

from ..errors import ConfigError
from . import results as R
from .data import resolve_task_dir

log = logging.getLogger(__name__)

# report(message, percent, eta_seconds): progress for the status (percent and ETA may be None).
Report = Callable[[str, float | None, int | None], None]
BOOTSTRAP_ITERS = 1000  # standard errors of non-mean metrics (perplexity); lm-eval's 100000 is slow
SEED = 1234


def select_models(gguf_files: Mapping[str, Path], spec: EvaluationSpec) -> list[tuple[str, Path]]:
    """The (name, path) pairs to evaluate, base first, then from most to least precise."""
    quants = [q for q in gguf_files if q != R.BASE]
    wanted = list(spec.quantizations) if spec.quantizations is not None else quants
    missing = [q for q in wanted if q not in gguf_files]
    if missing:
        raise ConfigError(Reason.INVALID_SPEC, f"evaluation.quantizations {missing} have no GGUF file "
                          f"(have {sorted(gguf_files)}): list them in export.gguf")
    if spec.include_base:
        if R.BASE not in gguf_files:
            raise ConfigError(Reason.INVALID_SPEC, "evaluation.includeBase is set but no base-model GGUF was given")
        wanted.append(R.BASE)
    if not wanted:
        raise ConfigError(Reason.INVALID_SPEC, "nothing to evaluate: no GGUF file selected")
    for name in wanted:
        if not Path(gguf_files[name]).is_file():
            raise ConfigError(Reason.MISSING_STAGE_OUTPUT, f"GGUF file for {name} not found: {gguf_files[name]}")
    return [(name, Path(gguf_files[name]).resolve()) for name in R.order_models(wanted)]


def _task_manager(cls, task_dir: Path | None, tasks: list[str]):
    """lm-eval's TaskManager; built-in tasks are indexed (~6 s) only when the offline folder lacks a name."""
    if task_dir:
        own = cls(include_path=str(task_dir), include_defaults=False)
        if all(t in own.all_tasks for t in tasks):
            return own
    return cls(include_path=str(task_dir) if task_dir else None)


def eta_seconds(elapsed: float, done: int, total: int, models_after: int = 0) -> int | None:
    """Seconds left: the rest of this pass at its rate so far, plus as long again per model still to come."""
    if done <= 0 or total <= 0:
        return None
    pass_seconds = elapsed * total / done
    return round(pass_seconds - elapsed + models_after * pass_seconds)


def _fmt_duration(seconds: int) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class _Throttled:
    """Log progress and forward it to report(message, percent, eta), at most every `interval` seconds."""

    def __init__(self, report: Report | None, interval: float = 10.0) -> None:
        self.report, self.interval, self.last = report, interval, float("-inf")

    def __call__(self, message: str, percent: float | None, eta: int | None = None, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        log.info("%s%s", message, "" if percent is None else f" ({percent:.0f}%)")
        if self.report:
            self.report(message, None if percent is None else round(percent, 1), eta)


def run_eval(gguf_files: Mapping[str, Path], spec: EvaluationSpec, workdir: Path, report: Report | None = None,
             *, model_args: Mapping[str, Any] | None = None, store: Any = None) -> dict[str, Any]:
    """Evaluate GGUF files on lm-eval tasks; write eval.json and eval.md into ``workdir``.

    Args:
        gguf_files: quantization type ("f16", "q8_0", "q4_k_m", ...) -> GGUF path, plus optionally
            "base" -> the base model's GGUF (evaluated when spec.includeBase).
        spec: tasks, limit, numFewshot, dataUri (offline task folder or s3:// prefix), quantizations
            (default: every key of gguf_files except "base"), includeBase.
        workdir: where eval.json, eval.md (and a downloaded dataUri) go.
        report: optional report(message, percent, eta_seconds) for progress: requests done/total of
            the current model in the message, the whole run's percent and an ETA.
        model_args: extra LlamaCppLM arguments (n_ctx, n_gpu_layers, n_threads, n_batch, max_length, head).
        store: the S3Store (s3.py) an s3:// dataUri is read with (default: from the environment).

    Returns:
        {model: {task: {metric: value}}, "quantizationCost": {"reference": "f16", "q4_k_m": {task:
        {metric: delta}}}, "fineTuningGain": {...}} — the last two only when they apply.
    """
    import lm_eval
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    from .llamacpp_lm import MODEL_NAME, LlamaCppLM

    started = time.monotonic()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    say = _Throttled(report)
    models = select_models(gguf_files, spec)
    task_dir = resolve_task_dir(spec.data_uri, workdir, store)
    tasks = list(spec.tasks)
    manager = _task_manager(TaskManager, task_dir, tasks)

    per_model: dict[str, R.TaskMetrics] = {}
    details: dict[str, R.TaskMetrics] = {}
    better: dict[str, dict[str, bool]] = {}
    info: dict[str, dict[str, Any]] = {}
    extra: dict[str, Any] = {}
    for n, (name, path) in enumerate(models):
        share = 100.0 / len(models)
        say(f"evaluating {name} ({path.name}) on {', '.join(tasks)}", n * share, None, force=True)

        pass_start: dict[str, float] = {}

        def progress(done: int, total: int, what: str, n=n, name=name, share=share, pass_start=pass_start) -> None:
            now = time.monotonic()
            start = pass_start.setdefault(what, now)  # the model reports 0 done as a pass starts
            eta = eta_seconds(now - start, done, total, models_after=len(models) - n - 1)
            left = "" if eta is None else f", ETA {_fmt_duration(eta)}"
            say(f"evaluating {name}: {what} requests {done}/{total}{left}",
                n * share + share * done / max(total, 1), eta, force=done == total)

        t0 = time.monotonic()
        head = None
        try:
            lm = LlamaCppLM(pretrained=str(path), progress=progress, **dict(model_args or {}))
            head = lm.head
            try:
                with contextlib.chdir(task_dir) if task_dir else contextlib.nullcontext():
                    out = evaluator.simple_evaluate(
                        model=lm, tasks=tasks, num_fewshot=spec.num_fewshot, limit=spec.limit,
                        task_manager=manager, log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS,
                        random_seed=SEED, numpy_random_seed=SEED, torch_random_seed=SEED, fewshot_random_seed=SEED)
            finally:
                lm.close()
        except (ValueError, RuntimeError) as exc:
            # The same file, tasks and settings fail the same way on a retry (a model llama.cpp cannot
            # load, a task whose requests do not fit the context): not a transient failure.
            raise ConfigError(Reason.EVALUATION_FAILED, f"evaluating {name} ({path.name}): {exc}") from exc
        if out is None:
            raise ConfigError(Reason.EVALUATION_FAILED, f"lm-eval returned no results for {name}")
        missing = [t for t in tasks if t not in (out.get("results") or {}) and t not in (out.get("groups") or {})]
        if missing:
            raise ConfigError(Reason.EVALUATION_FAILED, f"lm-eval produced no results for tasks {missing}")
        per_model[name], details[name] = R.summarize(out, tasks)
        better.update(R.higher_is_better(out))
        info[name] = {"file": path.name, "sizeBytes": path.stat().st_size,
                      "seconds": round(time.monotonic() - t0, 1), "head": head}
        extra = {"versions": out.get("versions"), "nSamples": out.get("n-samples"),
                 "numFewshot": out.get("n-shot")}

    metrics = R.build_metrics(per_model)
    header = [
        f"lm-evaluation-harness {lm_eval.__version__}, model `{MODEL_NAME}` (llama.cpp in process).",
        f"Tasks: {', '.join(tasks)} · limit: {spec.limit or 'none'} · few-shot: "
        f"{spec.num_fewshot if spec.num_fewshot is not None else 'task default'}"
        + (f" · data: {spec.data_uri}" if spec.data_uri else ""),
    ]
    document = {
        "harness": {"name": "lm-evaluation-harness", "version": lm_eval.__version__, "model": MODEL_NAME},
        "spec": spec.wire(),
        "models": info,
        "metrics": metrics,
        "details": details,
        "higherIsBetter": better,
        **extra,
        "seconds": round(time.monotonic() - started, 1),
    }
    (workdir / "eval.json").write_text(json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")
    (workdir / "eval.md").write_text(R.render_markdown(per_model, better, header))
    say(f"evaluation done in {document['seconds']} s", 100.0, 0, force=True)
    return metrics
