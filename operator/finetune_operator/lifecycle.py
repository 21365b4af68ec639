"""The run's state machine, as pure functions; the handlers act on what these decide.

- A spec edit: the run in hand (`in_place`, only runPolicy.suspend applied: `suspend_change`), or a
  new run (`new_run`), which retires the previous one to history (`retire`).
- A generation that cannot start (`not_started`): Failed until the spec changes for a spec problem
  (`SPEC_REASONS`: never retried), Pending while it waits for an object only the cluster can
  provide (`WAITING_REASONS`: retried); either way the earlier run is retired.
- A run in flight: (Job, Pods, trainer progress) → phase and conditions (`observe`), with Kueue's
  queue (`queued`), a deleted Job (`job_deleted`) and a finished result that stands (`settled`).
- A warm trainer (runPolicy.keepWarmSeconds): its reported run is Succeeded while its pod stays up;
  `handoff_refusal` says whether the next run may go to it instead of a new Job.

The operator owns `phase`, `reason`, `message`, `conditions` and `completionTime`; it derives them
level-style from what it observes each time, so a restarted operator converges to the same status.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from finetune_api import contract as c
from finetune_api.status import (
    SPEC_REASONS,
    STAGES,
    WAITING_REASONS,
    ConditionType,
    Phase,
    Reason,
    now_rfc3339,
    parse_rfc3339,
)

from .conditions import set_condition


@dataclass(frozen=True)
class Observation:
    phase: Phase
    reason: str
    message: str


def _true_conditions(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    conds = (job.get("status") or {}).get("conditions") or []
    return {c["type"]: c for c in conds if c.get("status") == "True"}


def termination_message(pods: list[dict[str, Any]]) -> tuple[str | None, str | None]:
    """(reason, message) the trainer wrote to its termination-message path, newest failed pod first."""
    def started(pod: dict[str, Any]) -> str:
        return (pod.get("status") or {}).get("startTime") or pod["metadata"].get("creationTimestamp") or ""

    for pod in sorted(pods, key=started, reverse=True):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or {}
            if term.get("exitCode", 0) == 0:
                continue
            raw = (term.get("message") or "").strip()
            try:
                doc = json.loads(raw.splitlines()[-1]) if raw else {}
            except (json.JSONDecodeError, IndexError):
                doc = {}
            if isinstance(doc, dict) and doc.get("reason"):
                return str(doc["reason"]), str(doc.get("message") or "")
            return None, raw[-2000:] or f"trainer exited with code {term.get('exitCode')}"
    return None, None


# Container states that keep a pod from ever running the trainer. The first two never heal by
# themselves; the rest may (a pull secret or a Secret key created later), so they stay Pending.
NEVER_STARTS = frozenset({"InvalidImageName", "ErrImageNeverPull"})
NOT_STARTING = NEVER_STARTS | {"ErrImagePull", "ImagePullBackOff", "CreateContainerConfigError",
                               "CreateContainerError", "RunContainerError"}


def not_starting(pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(waiting reason, message) of a container that cannot start, if any pod has one."""
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in NOT_STARTING:
                detail = (waiting.get("message") or "").strip()
                return waiting["reason"], (f"pod {pod['metadata']['name']} container {cs.get('name')}: "
                                           f"{waiting['reason']}{': ' + detail if detail else ''}")[:2000]
    return None


# FailedCreate messages of a pod that admission refuses whatever happens next in the cluster; the rest
# (exceeded quota, a ServiceAccount not there yet) may heal, so the run stays Pending and says why.
NEVER_CREATED = ("violates PodSecurity", "denied the request")


def not_created(job: dict[str, Any], failed_create: str | None) -> Observation | None:
    """The Job's FailedCreate (its newest Event's message), as an observation, if it has no pod for it."""
    if not failed_create:
        return None
    phase = Phase.FAILED if any(m in failed_create for m in NEVER_CREATED) else Phase.PENDING
    message = f"Job {job['metadata']['name']} cannot create its pod: {failed_create}"[:2000]
    return Observation(phase, Reason.POD_NOT_CREATED, message)


def completion_reported(status: dict[str, Any], run: int) -> bool:
    """The trainer's own completion report for `run`: its progress and a manifest among the artifacts."""
    progress = status.get("progress") or {}
    return progress.get("run") == run and any(a.get("kind") == "manifest" for a in status.get("artifacts") or [])


def _pending_message(pods: list[dict[str, Any]]) -> str:
    for pod in pods:
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                return f"pod {pod['metadata']['name']} unschedulable: {cond.get('message', '')}".strip()
    return "waiting for the trainer to start"


def observe(job: dict[str, Any] | None, pods: list[dict[str, Any]], progress: dict[str, Any] | None,
            run: int, queued: bool, reported: bool = False, failed_create: str | None = None, *,
            warm_until: str | None = None, handed_off: bool = False) -> Observation:
    """`reported`: the trainer's completion report for this run is in the status (completion_reported).
    `failed_create`: the message of the Job's newest FailedCreate Event, if any (quota, admission).
    `warm_until`: status.warm.until of this run's trainer; `handed_off`: status.handoff holds this run."""
    if job is None:
        return Observation(Phase.PENDING, Reason.JOB_PENDING, "creating the training Job")
    conds = _true_conditions(job)
    if reported and ({"Complete", "Failed"} & conds.keys() or warm_until):
        # Success is the trainer's own report of its artifacts, once its pod is done (exited 0, or failed
        # after the report: the run's result stands) or says it stays up warm for the next run. A pod
        # still on its way out keeps the run at its last stage: Finished then also means the GPU is free.
        message = "training finished; artifacts uploaded"
        if warm_until and not {"Complete", "Failed"} & conds.keys():
            message += f"; the trainer stays warm for a re-run until {warm_until} (status.warm)"
        return Observation(Phase.SUCCEEDED, Reason.COMPLETED, message)
    if "Complete" in conds:
        # A Job's Complete only says a pod exited 0.
        return Observation(Phase.FAILED, Reason.NO_COMPLETION_REPORT,
                           "the training Job completed but the trainer never reported its artifacts (manifest); "
                           "nothing of this run can be trusted to be in S3")
    if "Failed" in conds:
        job_reason = conds["Failed"].get("reason", "")
        trainer_reason, trainer_message = termination_message(pods)
        if job_reason == "DeadlineExceeded":
            return Observation(Phase.FAILED, Reason.DEADLINE_EXCEEDED, conds["Failed"].get("message", ""))
        default = Reason.CONFIG_ERROR if job_reason == "PodFailurePolicy" else Reason.BACKOFF_LIMIT_EXCEEDED
        message = trainer_message or conds["Failed"].get("message", "") or "the training Job failed"
        return Observation(Phase.FAILED, trainer_reason or default, message)
    if (job.get("spec") or {}).get("suspend"):
        if queued:
            return Observation(Phase.QUEUED, Reason.QUEUED, "waiting for Kueue to admit the Job")
        return Observation(Phase.SUSPENDED, Reason.SUSPENDED, "suspended by runPolicy.suspend")
    if not pods:
        refused = not_created(job, failed_create)
        if refused:
            return refused
    stuck = not_starting(pods)
    if stuck:
        phase = Phase.FAILED if stuck[0] in NEVER_STARTS else Phase.PENDING
        return Observation(phase, Reason.POD_NOT_STARTING, stuck[1])
    if progress and progress.get("run") == run and progress.get("stage") in {s.value for s in STAGES}:
        return Observation(Phase(progress["stage"]), Reason.STAGE_STARTED, progress.get("message") or progress["stage"])
    if handed_off:
        return handed_off_observation(job["metadata"]["name"], run)
    return Observation(Phase.PENDING, Reason.POD_PENDING, _pending_message(pods))


def handed_off_observation(job_name: str, run: int) -> Observation:
    return Observation(Phase.PENDING, Reason.HANDED_OFF,
                       f"run {run} handed to the warm trainer of Job {job_name}; waiting for it to take the run")


def handoff_refusal(status: dict[str, Any], job: dict[str, Any] | None, now: str | None = None) -> str | None:
    """Why the next run cannot go to the warm trainer of the run in `status` (its Job `job`), or None when
    it can: the trainer says it is warm for this run, whose completion it reported, with at least
    HANDOFF_MIN_LEFT_SECONDS left, and its Job runs (not finished, not suspended). That the new run's
    Job would be the same is builders.handoff_blocker's question."""
    warm, run = status.get("warm") or {}, status.get("run")
    if not warm:
        return "no warm trainer"
    if warm.get(c.WARM_RUN) != run or not completion_reported(status, run):
        return f"the warm trainer's run {warm.get(c.WARM_RUN)} is not run {run}, reported complete"
    try:  # the trainer pod writes it: a value it garbled is a refusal, never an operator crash
        left = (parse_rfc3339(str(warm.get(c.WARM_UNTIL))) - parse_rfc3339(now or now_rfc3339())).total_seconds()
    except ValueError:
        return f"the warm trainer's status.warm.until {str(warm.get(c.WARM_UNTIL))[:40]!r} is no RFC 3339 time"
    if left < c.HANDOFF_MIN_LEFT_SECONDS:
        return f"the warm trainer leaves in {max(0, int(left))} s"
    if job is None or job["metadata"]["name"] != status.get("jobName"):
        return f"Job {status.get('jobName')} is gone"
    if {"Complete", "Failed"} & _true_conditions(job).keys() or (job.get("spec") or {}).get("suspend"):
        return f"Job {job['metadata']['name']} is not running"
    if not (job.get("status") or {}).get("active"):
        return f"Job {job['metadata']['name']} has no pod"
    return None


def gpu_hours(start: str | None, end: str | None, gpus: int) -> float:
    """GPU-hours of a run from its RFC 3339 start and completion times."""
    if not (start and end and gpus):
        return 0.0
    return max(0.0, (parse_rfc3339(end) - parse_rfc3339(start)).total_seconds()) / 3600 * gpus


def status_update(status: dict[str, Any], obs: Observation, generation: int | None,
                  now: str | None = None) -> dict[str, Any]:
    """The operator-owned status fields for `obs`; empty when nothing changed."""
    now = now or now_rfc3339()
    phase = obs.phase
    conds = status.get("conditions") or []
    running = phase in STAGES
    conds = set_condition(conds, ConditionType.RUNNING, running, obs.reason if running else phase.value,
                          obs.message if running else "", generation, now)
    paused = phase in (Phase.SUSPENDED, Phase.QUEUED)
    conds = set_condition(conds, ConditionType.SUSPENDED, paused, obs.reason if paused else Reason.NOT_SUSPENDED,
                          obs.message if paused else "", generation, now)
    conds = set_condition(conds, ConditionType.SUCCEEDED, phase is Phase.SUCCEEDED,
                          obs.reason if phase in (Phase.SUCCEEDED, Phase.FAILED) else phase.value,
                          obs.message if phase is Phase.SUCCEEDED else "", generation, now)
    conds = set_condition(conds, ConditionType.FAILED, phase is Phase.FAILED,
                          obs.reason if phase is Phase.FAILED else Reason.NOT_FAILED,
                          obs.message if phase is Phase.FAILED else "", generation, now)
    conds = set_condition(conds, ConditionType.FINISHED, phase.finished,
                          obs.reason if phase.finished else Reason.NOT_FINISHED,
                          obs.message if phase.finished else "", generation, now)
    update: dict[str, Any] = {}
    if status.get("phase") != phase.value:
        update["phase"] = phase.value
    if status.get("reason") != str(obs.reason):
        update["reason"] = str(obs.reason)
    if status.get("message") != obs.message:
        update["message"] = obs.message
    if conds != (status.get("conditions") or []):
        update["conditions"] = conds
    if phase.finished and not status.get("completionTime"):
        update["completionTime"] = now
    return update


def transition(status: dict[str, Any], obs: Observation) -> bool:
    """Whether `obs` differs from what the status says: one Event and one log line per transition."""
    return (status.get("phase"), status.get("reason"), status.get("message")) != (
        obs.phase.value, str(obs.reason), obs.message)


# ----------------------------------------------------------------------------- runs


def in_place(status: dict[str, Any], spec_hash: str) -> bool:
    """The spec still describes the run in hand (an operator restart, a runPolicy.suspend toggle)."""
    return bool(status.get("run")) and status.get("specHash") == spec_hash and bool(status.get("jobName"))


def suspend_change(want: bool, job_suspended: bool, queue_name: str | None) -> bool | None:
    """The value to set on the run's Job's spec.suspend for an in-place edit, or None. Kueue owns
    unsuspending a queued Job: the operator never does."""
    if want and not job_suspended:
        return True
    if not want and job_suspended and not queue_name:
        return False
    return None


def queued(queue_name: str | None, suspend: bool) -> bool:
    """A Job with a Kueue queue is created suspended for Kueue to admit; suspended by the user, it is not queued."""
    return bool(queue_name) and not suspend


def retire(status: dict[str, Any], now: str | None = None) -> list[dict[str, Any]]:
    """status.history with the current run recorded (its Job is stopped by the caller)."""
    phase = status.get("phase") or Phase.PENDING.value
    entry = {
        "run": status.get("run"), "generation": status.get("observedGeneration"), "jobName": status.get("jobName"),
        "phase": phase if Phase(phase).finished else f"{phase} (superseded)",
        "startTime": status.get("startTime"), "completionTime": status.get("completionTime") or now or now_rfc3339(),
        "reason": status.get("reason"), "message": status.get("message"), "outputUri": status.get("outputUri"),
        "worldSize": status.get("worldSize"), "gpus": status.get("gpus"), "metrics": status.get("metrics"),
    }
    history = [h for h in status.get("history") or [] if h.get("run") != entry["run"]]
    return [*history, {k: v for k, v in entry.items() if v is not None}]


# Fields of a run; a generation that does not start has none of them.
_RUN_FIELDS = ("jobName", "specHash", "worldSize", "gpus", "progress", "metrics", "artifacts", "outputUri", "warm",
               "handoff")


def not_started(status: dict[str, Any], obs: Observation, generation: int | None,
                now: str | None = None) -> tuple[dict[str, Any], bool]:
    """(status update, whether it is a transition) for a generation that cannot start, `obs` saying why.
    An earlier run is retired to history, so the status describes this generation only: no old run
    keeps writing, nothing flaps, and no condition claims a generation that never ran. Events and the
    error counter go by the transition: one per change, not one per retry."""
    update: dict[str, Any] = {}
    if status.get("jobName"):
        update["history"] = retire(status, now)
        status = {**status, "phase": None, "reason": None, "message": None}
    update.update(status_update(status, obs, generation, now))
    update.update({"observedGeneration": generation, **dict.fromkeys(_RUN_FIELDS)})
    return update, transition(status, obs)


def retried(reason: str) -> bool:
    """Whether a generation that cannot start for `reason` is tried again: a spec problem waits for a
    spec change (Failed, sticky); a missing Secret, ConfigMap or ServiceAccount may appear (Pending)."""
    return reason not in SPEC_REASONS


def new_run(status: dict[str, Any], obs: Observation, generation: int | None, run: int, spec_hash: str,
            job_name: str, output_uri: str, now: str | None = None, *, world_size: int = 1,
            gpus: int = 0) -> dict[str, Any]:
    """The status of run `run` just started (its Job created or adopted); the previous run is retired.
    world_size: its training processes in all; gpus: GPUs in all (per pod × pods)."""
    now = now or now_rfc3339()
    update = {"history": retire(status, now)} if status.get("jobName") else {}
    update.update(status_update(status, obs, generation, now))
    update.update({"phase": obs.phase.value, "reason": str(obs.reason), "message": obs.message,
                   "run": run, "specHash": spec_hash, "jobName": job_name, "outputUri": output_uri,
                   "observedGeneration": generation, "startTime": now, "completionTime": None,
                   "worldSize": world_size, "gpus": gpus, "progress": None, "metrics": None, "artifacts": None,
                   # A warm trainer or handoff of the previous run is stale once its Job is replaced.
                   "warm": None, "handoff": None})
    return update


# ----------------------------------------------------------------------------- a run in flight


def in_flight(status: dict[str, Any]) -> bool:
    """A run whose status the operator follows: one started and not replaced by a generation that could not start."""
    return bool(status.get("run")) and bool(status.get("jobName"))


def settled(status: dict[str, Any], job: dict[str, Any] | None, deleted: bool) -> bool:
    """A finished run whose Job is gone (its TTL, or by hand): the result stands."""
    return Phase(status.get("phase") or Phase.PENDING.value).finished and (job is None or deleted)


def job_deleted(status: dict[str, Any], job: dict[str, Any] | None, deleted: bool) -> bool:
    """The run's Job went away before the run finished (a Job not created yet is not deleted)."""
    return deleted or job is None and status.get("phase") not in (None, Phase.PENDING.value)


def deleted_observation(status: dict[str, Any]) -> Observation:
    return Observation(Phase.FAILED, Reason.JOB_DELETED, f"Job {status.get('jobName')} was deleted before it finished")


def abandon_job(obs: Observation) -> bool:
    """A pod that can never start (or never be created): its Job would wait for ever, so the operator deletes it."""
    return obs.phase is Phase.FAILED and obs.reason in (Reason.POD_NOT_STARTING, Reason.POD_NOT_CREATED)


def warns(obs: Observation) -> bool:
    """A Warning Event (and one count of finetune_errors_total): a failure or a wait on a person."""
    return obs.phase is Phase.FAILED or obs.reason in WAITING_REASONS
