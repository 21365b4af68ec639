"""The search, as pure functions: trial records from child FinetuneJobs, sampling, early stopping,
and the sweep's status.

Stateless by construction: everything a decision needs is on the trial FinetuneJobs (their
number in a label, their parameters in an annotation, their outcome in their status). Trial k is
sampled from a study rebuilt from trials 0..k-1 with a sampler seeded from (seed, k), so after an
operator restart the same history gives the same draw; and since trial k's name is fixed
(<sweep>-t<k>) and its parameters are read back from the child, it is never created twice.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState as OptunaState

from finetune_api import API_VERSION, KIND, SWEEP_KIND
from finetune_api.status import WAITING_REASONS, Phase, Reason
from finetune_api.sweep import (
    BestTrial,
    FinetuneSweepSpec,
    Parameter,
    SweepPhase,
    TrialState,
    apply_parameters,
    trial_spec_error,
)

SWEEP_LABEL = "finetune.dev/sweep"
TRIAL_LABEL = "finetune.dev/trial"
PARAMS_ANNOTATION = "finetune.dev/trial-parameters"
PRUNED_ANNOTATION = "finetune.dev/pruned"  # the early-stopping verdict, kept on the trial itself
MAX_LOSS_POINTS = 50  # per trial in the sweep's status: enough for the median rule, bounded in size

optuna.logging.set_verbosity(optuna.logging.WARNING)


def trial_name(sweep: str, number: int) -> str:
    return f"{sweep}-t{number}"


@dataclass
class TrialRecord:
    number: int
    name: str
    params: dict[str, Any]
    state: str = TrialState.RUNNING
    phase: str | None = None
    value: float | None = None
    message: str | None = None
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss (loss_metric's)
    loss_metric: str = "trainLoss"  # evalLoss or trainLoss: which loss `losses` holds
    suspended: bool = False  # its spec's runPolicy.suspend
    output_uri: str | None = None
    artifacts: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.state != TrialState.RUNNING


def metric_value(status: dict[str, Any], path: str) -> float | None:
    """The number at a dotted path of a FinetuneJob's status (metrics.evalLoss), or None."""
    node: Any = status
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    if isinstance(node, bool) or not isinstance(node, int | float) or not math.isfinite(node):
        return None
    return float(node)


def loss_metric(spec: FinetuneSweepSpec) -> str:
    """The loss recorded for each trial: the one early stopping compares, else the training loss."""
    return spec.early_stopping.metric if spec.early_stopping else "trainLoss"


# Where a trial's progress report carries each loss: (its step, its value).
PROGRESS_LOSS = {"evalLoss": ("evalStep", "evalLoss"), "trainLoss": ("step", "loss")}


def record_from_child(child: dict[str, Any], spec: FinetuneSweepSpec,
                      seen_losses: dict[int, float] | None = None) -> TrialRecord:
    """What the search knows about one trial, from its FinetuneJob alone (plus losses seen earlier,
    of the same metric)."""
    meta, status = child["metadata"], child.get("status") or {}
    metric = loss_metric(spec)
    annotations = meta.get("annotations") or {}
    record = TrialRecord(
        number=int(meta["labels"][TRIAL_LABEL]), name=meta["name"],
        params=json.loads(annotations.get(PARAMS_ANNOTATION) or "{}"),
        phase=status.get("phase"), output_uri=status.get("outputUri"),
        artifacts=[a["uri"] for a in status.get("artifacts") or [] if a.get("uri")],
        suspended=bool(((child.get("spec") or {}).get("runPolicy") or {}).get("suspend")),
        losses=dict(seen_losses or {}), loss_metric=metric,
    )
    progress = status.get("progress") or {}
    step_key, loss_key = PROGRESS_LOSS[metric]
    if progress.get("run") in (None, status.get("run")) and progress.get(step_key) is not None \
            and progress.get(loss_key) is not None:
        record.losses[int(progress[step_key])] = float(progress[loss_key])
    if len(record.losses) > MAX_LOSS_POINTS:
        record.losses = dict(sorted(record.losses.items())[-MAX_LOSS_POINTS:])
    if annotations.get(PRUNED_ANNOTATION):
        record.state, record.message = TrialState.PRUNED, annotations[PRUNED_ANNOTATION]
    elif status.get("phase") == Phase.SUCCEEDED:
        record.value = metric_value(status, spec.objective.metric)
        if record.value is None:
            record.state = TrialState.FAILED
            record.message = f"succeeded without a number at status.{spec.objective.metric}"
        else:
            record.state = TrialState.COMPLETE
    elif status.get("reason") in WAITING_REASONS:  # Pending until the Secret/ConfigMap appears
        record.message = f"waiting: {status.get('message') or status.get('reason')}"[:1024]
    elif status.get("phase") == Phase.FAILED:
        record.state = TrialState.FAILED
        record.message = f"{status.get('reason') or 'Failed'}: {status.get('message') or ''}".rstrip(": ")[:1024]
    return record


def gather(spec: FinetuneSweepSpec, children: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[TrialRecord]:
    """Records of every trial: from its FinetuneJob where it exists, else from the sweep's own
    status (a trial deleted by hand, or a draw that failed validation), so that no number is reused.
    Loss points kept for another metric (earlyStopping.metric edited) are dropped."""
    metric = loss_metric(spec)
    seen = {row["number"]: {int(s): v for s, v in (row.get("losses") or {}).items()}
            if row.get("lossMetric", "trainLoss") == metric else {} for row in rows}
    records = {int(c["metadata"]["labels"][TRIAL_LABEL]): c for c in children}
    out = [record_from_child(c, spec, seen.get(k)) for k, c in records.items()]
    for row in rows:
        if row["number"] in records:
            continue
        state = row.get("state") or TrialState.FAILED
        gone = state == TrialState.RUNNING
        out.append(TrialRecord(
            number=row["number"], name=row["name"], params=row.get("parameters") or {},
            state=TrialState.FAILED if gone else state, phase=row.get("phase"), value=row.get("objective"),
            message="its FinetuneJob was deleted before it finished" if gone else row.get("message"),
            losses=seen[row["number"]], loss_metric=metric))
    return sorted(out, key=lambda r: r.number)


# ----------------------------------------------------------------------------- sampling


def distribution(param: Parameter) -> BaseDistribution:
    if param.choice:
        return CategoricalDistribution(param.choice.values)
    if param.uniform:
        return FloatDistribution(param.uniform.min, param.uniform.max)
    if param.log_uniform:
        return FloatDistribution(param.log_uniform.min, param.log_uniform.max, log=True)
    r = param.int_range
    # Optuna wants max reachable from min in steps; the last reachable value is the same search space.
    return IntDistribution(r.min, r.min + (r.max - r.min) // r.step * r.step, step=r.step)


def trial_seed(seed: int, number: int) -> int:
    digest = hashlib.sha256(f"{seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def max_trials(spec: FinetuneSweepSpec) -> int:
    return min(spec.max_trials, spec.grid_size()) if spec.algorithm == "grid" else spec.max_trials


def _sampler(spec: FinetuneSweepSpec, number: int) -> optuna.samplers.BaseSampler:
    seed = trial_seed(spec.seed, number)
    if spec.algorithm == "tpe":
        # constant_liar: running trials count as bad guesses, so parallel trials spread out.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, spec.parallelism), constant_liar=True)
    return optuna.samplers.RandomSampler(seed=seed)


def _fits(dist: BaseDistribution, value: Any) -> bool:
    try:
        return dist._contains(dist.to_internal_repr(value))
    except (ValueError, TypeError):
        return False


def build_study(spec: FinetuneSweepSpec, records: list[TrialRecord]) -> optuna.Study:
    """An in-memory Optuna study holding the given trials, in number order, as the sampler sees them."""
    dists = {p.path: distribution(p) for p in spec.parameters}
    study = optuna.create_study(direction=spec.objective.goal, sampler=optuna.samplers.RandomSampler(0))
    for rec in sorted(records, key=lambda r: r.number):
        state = {TrialState.COMPLETE: OptunaState.COMPLETE, TrialState.FAILED: OptunaState.FAIL,
                 TrialState.PRUNED: OptunaState.PRUNED}.get(rec.state, OptunaState.RUNNING)
        # A spec edited mid-sweep may have moved a space: old values outside it are left out.
        params = {p: v for p, v in rec.params.items() if p in dists and _fits(dists[p], v)}
        study.add_trial(optuna.trial.create_trial(
            state=state, params=params, distributions={p: dists[p] for p in params},
            value=rec.value if state == OptunaState.COMPLETE else None,
            intermediate_values={s: v for s, v in rec.losses.items()}))
    return study


def sample(spec: FinetuneSweepSpec, number: int, history: list[TrialRecord]) -> dict[str, Any]:
    """Parameters of trial `number`, given the trials before it (for grid: its place in the grid)."""
    if spec.algorithm == "grid":
        point = next(itertools.islice(itertools.product(*(p.grid() for p in spec.parameters)), number, None))
        return {p.path: v for p, v in zip(spec.parameters, point, strict=True)}
    study = build_study(spec, [r for r in history if r.number < number])
    study.sampler = _sampler(spec, number)
    trial = study.ask({p.path: distribution(p) for p in spec.parameters})
    return dict(trial.params)


# ----------------------------------------------------------------------------- trial objects


def build_trial(sweep: dict[str, Any], number: int, params: dict[str, Any], suspend: bool) -> dict[str, Any]:
    """The trial FinetuneJob: the template with the parameters applied, owned by the sweep."""
    meta = sweep["metadata"]
    spec = apply_parameters(sweep["spec"]["template"], params)
    if suspend:
        spec.setdefault("runPolicy", {})["suspend"] = True
    return {
        "apiVersion": API_VERSION, "kind": KIND,
        "metadata": {
            "name": trial_name(meta["name"], number), "namespace": meta["namespace"],
            "labels": {SWEEP_LABEL: meta["name"], TRIAL_LABEL: str(number)},
            "annotations": {PARAMS_ANNOTATION: json.dumps(params, sort_keys=True)},
            "ownerReferences": [{"apiVersion": API_VERSION, "kind": SWEEP_KIND, "name": meta["name"],
                                 "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": spec,
    }


def check_trial(spec: FinetuneSweepSpec, params: dict[str, Any]) -> str | None:
    """Every sampled trial spec must be a valid FinetuneJob spec (ends and choices were checked; this
    catches combinations, e.g. two parameters that together break a rule)."""
    return trial_spec_error(spec.template, params)


# ----------------------------------------------------------------------------- early stopping


def _loss_at(losses: dict[int, float], step: int) -> float | None:
    """The latest loss reported at or before `step`."""
    before = [s for s in losses if s <= step]
    return losses[max(before)] if before else None


def should_stop(spec: FinetuneSweepSpec, trial: TrialRecord, records: list[TrialRecord]) -> str | None:
    """The median stopping rule: why to stop this running trial, or None to let it go on.

    Stopped when at least minTrials trials have completed and its latest loss (earlyStopping.metric:
    the validation loss at its latest eval step, or the training loss) is worse than the median of
    theirs at the same step, or the latest before it (lower loss is better, whatever the objective)."""
    rule = spec.early_stopping
    if rule is None or trial.finished or not trial.losses:
        return None
    step = max(trial.losses)
    if step < rule.min_steps:
        return None
    peers = [v for r in records if r.state == TrialState.COMPLETE and r.number != trial.number
             for v in [_loss_at(r.losses, step)] if v is not None]
    if len(peers) < rule.min_trials:
        return None
    median = statistics.median(peers)
    loss = trial.losses[step]
    if loss > median:
        what = "eval loss" if rule.metric == "evalLoss" else "training loss"
        return (f"{what} {loss:.4g} at step {step} is worse than the median {median:.4g} of {len(peers)} "
                "completed trials")
    return None


# ----------------------------------------------------------------------------- status


def best(spec: FinetuneSweepSpec, records: list[TrialRecord]) -> TrialRecord | None:
    done = [r for r in records if r.state == TrialState.COMPLETE and r.value is not None]
    if not done:
        return None
    sign = 1 if spec.objective.goal == "minimize" else -1
    return min(done, key=lambda r: (sign * r.value, r.number))


def next_numbers(spec: FinetuneSweepSpec, records: list[TrialRecord], suspended: bool) -> list[int]:
    """Trial numbers to create now: fill free parallel slots, never past the trial budget."""
    if suspended:
        return []
    running = sum(not r.finished for r in records)
    start = max((r.number for r in records), default=-1) + 1
    room = min(spec.parallelism - running, max_trials(spec) - start)
    return list(range(start, start + max(room, 0)))


def sweep_status(spec: FinetuneSweepSpec, records: list[TrialRecord], suspended: bool,
                 total: int) -> dict[str, Any]:
    """phase, reason, message, trials, bestTrial and trialProgress (conditions are added by the caller)."""
    records = sorted(records, key=lambda r: r.number)
    finished = sum(r.finished for r in records)
    top = best(spec, records)
    out: dict[str, Any] = {
        "trialProgress": f"{finished}/{total}",
        "trials": [{k: v for k, v in {
            "number": r.number, "name": r.name, "parameters": r.params, "phase": r.phase, "state": r.state,
            "objective": r.value, "message": r.message,
            "losses": {str(s): v for s, v in sorted(r.losses.items())} or None,
            "lossMetric": r.loss_metric if r.losses else None,
        }.items() if v is not None} for r in records],
        "bestTrial": None if top is None else BestTrial(
            number=top.number, name=top.name, value=top.value, parameters=top.params, output_uri=top.output_uri,
            artifacts=top.artifacts or None).wire(),
    }
    complete = sum(r.state == TrialState.COMPLETE for r in records)
    if finished >= total and len(records) >= total:
        if complete:
            out.update(phase=SweepPhase.SUCCEEDED, reason=Reason.COMPLETED,
                       message=f"{complete} of {total} trials completed; best {top.name} "
                               f"({spec.objective.metric}={top.value:.6g})")
        else:
            out.update(phase=SweepPhase.FAILED, reason=Reason.NO_TRIAL_SUCCEEDED,
                       message=f"none of {total} trials reported {spec.objective.metric}")
    elif suspended:
        out.update(phase=SweepPhase.SUSPENDED, reason=Reason.SUSPENDED, message="spec.suspend is true")
    elif records:
        out.update(phase=SweepPhase.RUNNING, reason=Reason.TRIALS_RUNNING,
                   message=f"{finished} of {total} trials finished, {len(records) - finished} running")
    else:
        out.update(phase=SweepPhase.PENDING, reason=Reason.STARTING, message="creating the first trials")
    return out
