"""Pure functions from lm-eval's result dicts to status metrics, quantization cost and a Markdown table.

Nothing here loads a model; every function takes and returns plain dicts, so the tables and the
cost arithmetic are unit-tested without llama.cpp.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from finetune_api.spec import GGUF_QUANT_TYPES

BASE = "base"  # key of the un-fine-tuned model in gguf_files and in the results
# The quantization every other one is compared with: the most precise one that was evaluated.
REFERENCE_ORDER = ("f32", "f16", "bf16", *[q for q in GGUF_QUANT_TYPES if q not in ("f32", "f16", "bf16")])
STDERR = "_stderr"
DIGITS = 6

TaskMetrics = dict[str, dict[str, float]]  # task -> metric -> value


def order_models(names: Iterable[str]) -> list[str]:
    """base first, then the quantizations from most to least precise, unknown names last."""
    rank = {q: i for i, q in enumerate(REFERENCE_ORDER)}
    return sorted(names, key=lambda n: (n != BASE, rank.get(n, len(rank)), n))


def reference_quant(names: Iterable[str]) -> str | None:
    quants = [n for n in order_models(names) if n != BASE]
    return quants[0] if quants else None


def _metric_name(metric: str, filt: str, n_filters: int) -> str:
    return metric if filt == "none" or n_filters == 1 else f"{metric},{filt}"


def task_metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    """One lm-eval results entry ({"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}) -> {"acc": 0.5, ...}.

    The filter suffix is dropped when a metric has a single filter (the common case); values that are
    not numbers ("N/A" standard errors) are left out.
    """
    filters: dict[str, set[str]] = {}
    for key in entry:
        if "," in key:
            metric, filt = key.split(",", 1)
            filters.setdefault(metric.removesuffix(STDERR), set()).add(filt)
    out: dict[str, float] = {}
    for key, value in entry.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        metric, filt = key.split(",", 1)
        stderr = metric.endswith(STDERR)
        base = metric.removesuffix(STDERR)
        name = _metric_name(base, filt, len(filters.get(base, ())))
        out[name + (STDERR if stderr else "")] = round(float(value), DIGITS)
    return out


def summarize(lm_results: Mapping[str, Any], tasks: Iterable[str]) -> tuple[TaskMetrics, TaskMetrics]:
    """(metrics of the requested tasks and groups, metrics of every task and subtask lm-eval ran)."""
    details: TaskMetrics = {}
    for section in ("results", "groups"):
        for name, entry in (lm_results.get(section) or {}).items():
            details.setdefault(name, {}).update(task_metrics(entry))
    summary = {t: details[t] for t in tasks if t in details}
    return summary, details


def higher_is_better(lm_results: Mapping[str, Any]) -> dict[str, dict[str, bool]]:
    return {task: {m: bool(v) for m, v in metrics.items() if v is not None}
            for task, metrics in (lm_results.get("higher_is_better") or {}).items()}


def _diff(a: TaskMetrics, b: TaskMetrics) -> TaskMetrics:
    """a - b for every (task, metric) both have, standard errors left out."""
    out: TaskMetrics = {}
    for task, metrics in a.items():
        for metric, value in metrics.items():
            if metric.endswith(STDERR) or metric not in b.get(task, {}):
                continue
            out.setdefault(task, {})[metric] = round(value - b[task][metric], DIGITS)
    return out


def quantization_cost(per_model: Mapping[str, TaskMetrics]) -> dict[str, Any] | None:
    """Each quantization minus the most precise one evaluated (e.g. q4_k_m − f16), per task and metric.

    Negative means the quantized file scores lower. For metrics where lower is better (perplexity)
    read the sign the other way; eval.md marks each metric with ↑ or ↓.
    """
    ref = reference_quant(per_model)
    others = [q for q in order_models(per_model) if q not in (BASE, ref)]
    if ref is None or not others:
        return None
    return {"reference": ref, **{q: _diff(per_model[q], per_model[ref]) for q in others}}


def fine_tuning_gain(per_model: Mapping[str, TaskMetrics]) -> dict[str, Any] | None:
    """The most precise fine-tuned quantization minus the base model, per task and metric."""
    ref = reference_quant(per_model)
    if ref is None or BASE not in per_model:
        return None
    return {"model": ref, "base": BASE, "delta": _diff(per_model[ref], per_model[BASE])}


def build_metrics(per_model: Mapping[str, TaskMetrics]) -> dict[str, Any]:
    """The dict for status.metrics.eval: {model: {task: {metric: value}}, quantizationCost, fineTuningGain}."""
    out: dict[str, Any] = {m: per_model[m] for m in order_models(per_model)}
    if (cost := quantization_cost(per_model)) is not None:
        out["quantizationCost"] = cost
    if (gain := fine_tuning_gain(per_model)) is not None:
        out["fineTuningGain"] = gain
    return out


def _fmt(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "–"
    text = f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"
    return f"{text} ± {stderr:.4f}" if stderr is not None else text


def _fmt_delta(value: float | None) -> str:
    return "–" if value is None else f"{value:+.4f}"


def render_markdown(per_model: Mapping[str, TaskMetrics], better: Mapping[str, Mapping[str, bool]],
                    header: Iterable[str] = ()) -> str:
    """One row per (task, metric), one column per model, then one Δ column per quantization vs the reference."""
    models = order_models(per_model)
    ref = reference_quant(models)
    deltas = [(q, ref) for q in models if q not in (BASE, ref)]
    if ref and BASE in per_model:
        deltas.insert(0, (ref, BASE))
    lines = ["# Evaluation", "", *header, ""] if header else ["# Evaluation", ""]
    cols = ["Task", "Metric", *models, *[f"{a} − {b}" for a, b in deltas]]
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    tasks = list(dict.fromkeys(t for m in models for t in per_model[m]))
    for task in tasks:
        metrics = list(dict.fromkeys(k for m in models for k in per_model[m].get(task, {}) if not k.endswith(STDERR)))
        for metric in metrics:
            hib = better.get(task, {}).get(metric.split(",")[0])
            arrow = "" if hib is None else (" ↑" if hib else " ↓")
            row = [task, metric + arrow]
            for m in models:
                vals = per_model[m].get(task, {})
                row.append(_fmt(vals.get(metric), vals.get(metric + STDERR)))
            for a, b in deltas:
                va, vb = per_model[a].get(task, {}).get(metric), per_model[b].get(task, {}).get(metric)
                row.append(_fmt_delta(None if va is None or vb is None else va - vb))
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "↑ higher is better, ↓ lower is better; ± is the standard error lm-eval reports.", ""]
    return "\n".join(lines)
