"""Kopf handlers for FinetuneSweep: they decide; `sweep_study` samples and derives the status.

One level-triggered reconcile, run on every event of a sweep and of its trial FinetuneJobs (the
initial listing after a restart included): read the sweep and its trials, stop or suspend trials
as the spec says, create the trials that fit (create-if-absent under deterministic names), then
write the status derived from what exists. Event handlers only: no finalizers, no Kopf
bookkeeping on the sweep; trials go with their sweep through garbage collection.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from typing import Any

import kopf
from pydantic import ValidationError

from finetune_api import GROUP, PLURAL, SWEEP_PLURAL, VERSION
from finetune_api.status import Reason
from finetune_api.sweep import FinetuneSweepSpec, SweepPhase, TrialState

from . import kube
from . import sweep_study as study
from .conditions import set_condition

SWEEPS = (GROUP, VERSION, SWEEP_PLURAL)
_LOCKS: dict[tuple[str, str], threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock(namespace: str, name: str) -> threading.Lock:
    # Events of several trials arrive on different workers; one sweep reconciles one at a time.
    with _LOCKS_GUARD:
        return _LOCKS.setdefault((namespace, name), threading.Lock())


@kopf.on.event(*SWEEPS)
def sweep_event(event: dict[str, Any], body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    if event.get("type") == "DELETED":
        _LOCKS.pop((body.metadata.namespace, body.metadata.name), None)
        return
    reconcile(body.metadata.namespace, body.metadata.name, logger)


@kopf.on.event(GROUP, VERSION, PLURAL, labels={study.SWEEP_LABEL: kopf.PRESENT})
def trial_event(event: dict[str, Any], body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    reconcile(body.metadata.namespace, body.metadata.labels[study.SWEEP_LABEL], logger)


def reconcile(namespace: str, name: str, logger: logging.Logger) -> None:
    with _lock(namespace, name):
        sweep = kube.read_or_none(kube.custom().get_namespaced_custom_object, GROUP, VERSION, namespace,
                                  SWEEP_PLURAL, name)
        if sweep is not None:
            _reconcile(sweep, logger)


def _format_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"spec.{loc}: {msg}" if loc else f"spec.{msg}" if msg.startswith("parameters") else f"spec: {msg}")
    return "; ".join(parts)


def list_trials(namespace: str, sweep: dict[str, Any]) -> list[dict[str, Any]]:
    meta = sweep["metadata"]
    found = kube.custom().list_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, label_selector=f"{study.SWEEP_LABEL}={meta['name']}")["items"]
    # A trial of an earlier sweep of the same name (being garbage-collected) is not ours.
    return [t for t in found if any(o.get("uid") == meta["uid"] for o in t["metadata"].get("ownerReferences") or [])]


def _patch_trial(namespace: str, name: str, patch: dict[str, Any]) -> None:
    kube.custom().patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch)


def _reconcile(sweep: dict[str, Any], logger: logging.Logger) -> None:
    meta, status = sweep["metadata"], dict(sweep.get("status") or {})
    namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    try:
        spec = FinetuneSweepSpec.model_validate(sweep.get("spec") or {})
    except ValidationError as exc:
        _write_status(sweep, {"phase": SweepPhase.FAILED, "reason": Reason.INVALID_SPEC, "message": _format_error(exc),
                              "observedGeneration": generation})
        return

    records = study.gather(spec, list_trials(namespace, sweep), status.get("trials") or [])

    template_suspend = spec.template.run_policy.suspend
    for rec in records:
        reason = study.should_stop(spec, rec, records)
        if reason:
            _patch_trial(namespace, rec.name, {"metadata": {"annotations": {study.PRUNED_ANNOTATION: reason}},
                                               "spec": {"runPolicy": {"suspend": True}}})
            rec.state, rec.message, rec.suspended = TrialState.PRUNED, reason, True
            kopf.event(sweep, type="Normal", reason=Reason.TRIAL_PRUNED, message=f"{rec.name}: {reason}"[:1024])
            logger.info("trial %s pruned: %s", rec.name, reason)
        unfinished = rec.state == TrialState.RUNNING
        want = spec.suspend or template_suspend
        if unfinished and rec.suspended != want:
            _patch_trial(namespace, rec.name, {"spec": {"runPolicy": {"suspend": want}}})
            rec.suspended = want
            logger.info("trial %s %s", rec.name, "suspended" if want else "resumed")

    create = functools.partial(kube.custom().create_namespaced_custom_object, GROUP, VERSION)
    for number in study.next_numbers(spec, records, spec.suspend):
        params = study.sample(spec, number, records)
        error = study.check_trial(spec, params)
        if error:  # recorded, not retried: the same draw would fail again
            records.append(study.TrialRecord(number, study.trial_name(name, number), params,
                                             state=TrialState.FAILED, message=f"invalid trial spec: {error}"))
            continue
        body = study.build_trial(sweep, number, params, suspend=template_suspend)
        created = kube.create_if_absent(lambda ns, b: create(ns, PLURAL, b), namespace, body)
        child = body if created else kube.read_finetunejob(namespace, body["metadata"]["name"]) or body
        if not created and not kube.controlled_by(child, sweep["metadata"]["uid"]):
            # Someone else's FinetuneJob has the trial's name: never read its status as the trial's,
            # never suspend it. Recorded as failed, not retried (the name is deterministic).
            message = (f"a FinetuneJob named {body['metadata']['name']} exists and this sweep does not own it; "
                       "the trial was not run")
            records.append(study.TrialRecord(number, body["metadata"]["name"], params, state=TrialState.FAILED,
                                             message=message))
            logger.warning("trial %s: %s", body["metadata"]["name"], message)
            continue
        records.append(study.record_from_child(child, spec))
        if created:
            kopf.event(sweep, type="Normal", reason=Reason.TRIAL_CREATED,
                       message=f"{body['metadata']['name']}: {json.dumps(params, sort_keys=True)}"[:1024])
            logger.info("trial %s created with %s", body["metadata"]["name"], params)

    update = study.sweep_status(spec, records, spec.suspend, study.max_trials(spec))
    update["observedGeneration"] = generation
    _write_status(sweep, update)


def _write_status(sweep: dict[str, Any], update: dict[str, Any]) -> None:
    status = sweep.get("status") or {}
    phase, reason, message = update["phase"], update["reason"], update["message"]
    generation = sweep["metadata"].get("generation")
    conds = status.get("conditions")
    conds = set_condition(conds, "Running", phase in (SweepPhase.PENDING, SweepPhase.RUNNING), reason, message, generation)
    conds = set_condition(conds, "Suspended", phase == SweepPhase.SUSPENDED, reason, message, generation)
    conds = set_condition(conds, "Succeeded", phase == SweepPhase.SUCCEEDED, reason, message, generation)
    conds = set_condition(conds, "Failed", phase == SweepPhase.FAILED, reason, message, generation)
    update = {**update, "conditions": conds}
    if all(status.get(k) == v for k, v in update.items()):
        return  # our own patches come back as events; an unchanged status ends the loop
    if phase != status.get("phase"):
        kopf.event(sweep, type="Warning" if phase == SweepPhase.FAILED else "Normal", reason=phase,
                   message=message[:1024])
    meta = sweep["metadata"]
    kube.patch_sweep_status(meta["namespace"], meta["name"], update)
