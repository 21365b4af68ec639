"""Kopf handlers: they decide; `builders` construct; `lifecycle` derives the status.

- create / spec update / resume → `ensure_run`: validate, then make sure the Job of the current
  spec exists (a changed spec starts run N+1; only runPolicy.suspend is applied in place).
- every event of a FinetuneJob or of its Job → `sync_status`: phase and conditions from what is
  observed. No delete handler exists on purpose: no finalizer, so nothing hangs after uninstall;
  children go with their owner through garbage collection.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, NoReturn

import kopf
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from finetune_api import GROUP, PLURAL, VERSION, RunConfig
from finetune_api import contract as c
from finetune_api.spec import FinetuneJobSpec
from finetune_api.status import Phase, Reason

from . import builders, kube, lifecycle, metrics, policy
from .config import OperatorConfig
from .lifecycle import Observation, completion_reported, gpu_hours, observe, status_update

LOG = logging.getLogger("finetune_operator")
CONFIG = OperatorConfig.from_env()
RESOURCE = (GROUP, VERSION, PLURAL)
MISSING_REF_RETRY = 30  # seconds: a Secret or ConfigMap created later lets the job proceed
POD_CREATE_RECHECK = 10  # seconds between looks at a Job without a pod for its FailedCreate Events
LEFTOVER_RETRY = 5  # seconds: a deleted namesake's children go with it, through garbage collection
kube.limit_status_writes(CONFIG.status_writes_per_second)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Stalled watches are a known Kopf trap: have the server close them and the client give up later.
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.watching.connect_timeout = 30
    # Keep Kopf's bookkeeping in annotations: status is ours and schema-pruned.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="finetune.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="finetune.dev", key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # our own transition events are posted explicitly
    settings.execution.max_workers = 16
    kube.reset()
    metrics.start_server(CONFIG.metrics_port)
    threading.Thread(target=recheck_runs_without_a_pod, name="recheck-runs-without-a-pod", daemon=True).start()


# ----------------------------------------------------------------------------- validation


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"spec.{loc}: {msg}" if loc else f"spec: {msg}")
    return "; ".join(parts)


def missing_references(spec: FinetuneJobSpec, namespace: str) -> tuple[str, str] | None:
    """What only the cluster can tell: referenced Secrets, keys, ConfigMaps, ServiceAccounts exist."""
    secrets: list[tuple[str, str, list[str]]] = []
    s3_ref = spec.output.s3.credentials_secret_ref
    if s3_ref:
        secrets.append(("spec.output.s3.credentialsSecretRef", s3_ref.name,
                        [s3_ref.access_key_id_key, s3_ref.secret_access_key_key]))
    hf_ref = spec.base_model.token_secret_ref
    if hf_ref:
        secrets.append(("spec.baseModel.tokenSecretRef", hf_ref.name, [hf_ref.key]))
    for field, name, keys in secrets:
        secret = kube.read_or_none(kube.core().read_namespaced_secret, name, namespace)
        if secret is None:
            return Reason.SECRET_NOT_FOUND, f"{field}: Secret {name!r} not found in namespace {namespace!r}"
        absent = [k for k in keys if k not in (secret.get("data") or {}) and k not in (secret.get("stringData") or {})]
        if absent:
            return Reason.SECRET_NOT_FOUND, f"{field}: Secret {name!r} has no key {absent[0]!r}"
    cm_ref = spec.dataset.config_map_ref
    if cm_ref:
        cm = kube.read_or_none(kube.core().read_namespaced_config_map, cm_ref.name, namespace)
        if cm is None:
            return Reason.CONFIGMAP_NOT_FOUND, f"spec.dataset.configMapRef: ConfigMap {cm_ref.name!r} not found"
        if cm_ref.key not in (cm.get("data") or {}):
            return Reason.CONFIGMAP_NOT_FOUND, f"spec.dataset.configMapRef: ConfigMap {cm_ref.name!r} has no key {cm_ref.key!r}"
    sa = spec.resources.service_account_name
    if sa and kube.read_or_none(kube.core().read_namespaced_service_account, sa, namespace) is None:
        return Reason.SERVICE_ACCOUNT_NOT_FOUND, f"spec.resources.serviceAccountName: ServiceAccount {sa!r} not found"
    return None


def _not_started(body: kopf.Body, status: dict[str, Any], patch: kopf.Patch, obs: Observation,
                 logger: logging.Logger) -> NoReturn:
    """This generation cannot start (lifecycle.not_started): stop the earlier run's Job, write the
    status, then end the handler: for good on a spec problem, retried while waiting for an object."""
    generation = body.metadata.get("generation")
    if status.get("jobName"):
        _delete_job(body.metadata.namespace, status["jobName"])
    update, changed = lifecycle.not_started(status, obs, generation)
    patch.status.update(update)
    if changed:
        kopf.event(body, type="Warning", reason=str(obs.reason), message=obs.message[:1024])
        metrics.ERRORS.labels(reason=str(obs.reason)).inc()
        logger.warning("generation %s not started: %s: %s", generation, obs.reason, obs.message)
    if lifecycle.retried(obs.reason):
        raise kopf.TemporaryError(obs.message, delay=MISSING_REF_RETRY)
    raise kopf.PermanentError(f"{obs.reason}: {obs.message}")


# ----------------------------------------------------------------------------- runs


@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
@kopf.on.resume(*RESOURCE)
def ensure_run(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, patch: kopf.Patch,
               logger: logging.Logger, **_: Any) -> None:
    started = time.monotonic()
    try:
        _ensure_run(body, dict(spec), dict(status), patch, logger)
    finally:
        if patch.status:  # Kopf applies the patch as the handler returns: under the same rate limit
            kube.status_write_slot()
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)


def _refuse(body: kopf.Body, status: dict[str, Any], patch: kopf.Patch, reason: str, message: str,
            logger: logging.Logger) -> NoReturn:
    """A spec problem: Failed until the spec changes; never retried, nothing created."""
    _not_started(body, status, patch, Observation(Phase.FAILED, reason, message), logger)


def _ensure_run(body: kopf.Body, raw_spec: dict[str, Any], status: dict[str, Any], patch: kopf.Patch,
                logger: logging.Logger) -> None:
    name, namespace = body.metadata.name, body.metadata.namespace
    generation = body.metadata.get("generation")
    try:
        spec = builders.resolve_spec(raw_spec, CONFIG)
    except ValueError as exc:  # pydantic's ValidationError included
        message = format_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        _refuse(body, status, patch, Reason.INVALID_SPEC, message, logger)
    wanted = builders.spec_hash(raw_spec)
    run = int(status.get("run") or 0)
    if lifecycle.in_place(status, wanted):  # it was checked when it started
        _apply_in_place(body, spec, status, patch, logger)
        return
    problems = policy.violations(spec, CONFIG)
    if problems:
        _refuse(body, status, patch, Reason.POLICY_DENIED, "; ".join(problems), logger)
    missing = missing_references(spec, namespace)
    if missing:
        _not_started(body, status, patch, Observation(Phase.PENDING, *missing), logger)

    # A new run: the first one, or the spec changed. Children first, status last, with deterministic
    # names, so that a crash in between is healed by the next attempt adopting what exists.
    new_run = run + 1
    owner = dict(body)
    service_account = spec.resources.service_account_name or builders.trainer_account_name(name)
    run_config = builders.build_run_config(spec, owner, new_run, policy.egress_policy(CONFIG))
    config_map = builders.build_config_map(run_config, owner)
    job = builders.build_job(spec, owner, new_run, CONFIG, service_account=service_account, raw_spec_hash=wanted,
                             live_jobs=metrics.live_jobs(), config_digest=builders.config_sha256(config_map))
    # The apiserver judges the Job before anything of the run exists: a spec it would refuse
    # (quantities, affinity, label keys...) fails with its message and leaves nothing behind.
    rejected = kube.dry_run_create_job(namespace, job)
    if rejected:
        _refuse(body, status, patch, Reason.JOB_REJECTED,
                f"the apiserver rejected the training Job built from spec.resources/spec.runPolicy: {rejected}",
                logger)
    # The Role first: the apiserver lets the operator bind only a Role that exists (its escalation check).
    children = [builders.build_role(owner)]
    if not spec.resources.service_account_name:
        # Only an account the operator created gets its Role: it never grants rights to one it did not make.
        children += [builders.build_service_account(owner), builders.build_role_binding(owner, service_account)]
    children.append(config_map)
    if _hand_off(body, spec, status, patch, children, job, run_config, logger):
        return
    if spec.resources.nodes > 1:  # the pods' names resolve (for the rendezvous) once they start
        children.append(builders.build_service(spec, owner, new_run))
    children.append(job)
    created = _create_children(body, status, patch, children, logger)
    if status.get("jobName"):
        _delete_job(namespace, status["jobName"])

    obs = observe(job, [], None, new_run, queued=lifecycle.queued(spec.run_policy.queue_name, spec.run_policy.suspend))
    patch.status.update(lifecycle.new_run(status, obs, generation, new_run, wanted, job["metadata"]["name"],
                                          run_config.output_uri, world_size=spec.resources.world_size,
                                          gpus=spec.resources.gpus * spec.resources.nodes))
    reason = Reason.SPEC_CHANGED if run else Reason.JOB_CREATED
    message = f"run {new_run}: Job {job['metadata']['name']} {'created' if created else 'adopted'}"
    kopf.event(body, type="Normal", reason=str(reason), message=message)
    logger.info(message)


def _hand_off(body: kopf.Body, spec: FinetuneJobSpec, status: dict[str, Any], patch: kopf.Patch,
              children: list[dict[str, Any]], job: dict[str, Any], run_config: RunConfig,
              logger: logging.Logger) -> bool:
    """Run N+1 goes to the warm trainer of run N (runPolicy.keepWarmSeconds) instead of a new Job, where
    that trainer is still there and the new Job would be its Job but for the run: the run's other
    children are made as usual, then one JSON Patch that tests `/status/warm` moves the status to the
    new run and puts its config in `/status/handoff`. False (nothing handed off) sends the caller on to
    a new Job; the test failing means the trainer left in between, and the new Job replaces it."""
    namespace, new_run = body.metadata.namespace, run_config.job.run
    warm_job = kube.read_job(namespace, status["jobName"]) if status.get("warm") and status.get("jobName") else None
    if warm_job is None:
        return False
    why_not = lifecycle.handoff_refusal(status, warm_job)
    if why_not is None and (spec.run_policy.suspend or lifecycle.queued(spec.run_policy.queue_name, False)):
        why_not = "the new run is suspended or queued"
    why_not = why_not or builders.handoff_blocker(warm_job, job)
    if why_not:
        logger.info("run %s: a new Job, not the warm trainer: %s", new_run, why_not)
        return False
    _create_children(body, status, patch, children, logger)
    config_map = children[-1]
    name = warm_job["metadata"]["name"]
    obs = lifecycle.handed_off_observation(name, new_run)
    wanted = job["metadata"]["annotations"][builders.SPEC_HASH_ANNOTATION]
    fields = lifecycle.new_run(status, obs, body.metadata.get("generation"), new_run, wanted, name,
                               run_config.output_uri, world_size=spec.resources.world_size,
                               gpus=spec.resources.gpus * spec.resources.nodes)
    fields = {k: v for k, v in fields.items() if k not in ("warm", "handoff")}  # the patch's own
    ops = c.handoff_patch(status["warm"], new_run, config_map["data"][c.CONFIG_FILE],
                          builders.config_sha256(config_map), fields, seen=status)
    refused = kube.patch_finetunejob_status_ops(namespace, body.metadata.name, ops)
    if refused:  # the test failed: the trainer left (or the status moved on) since it was read
        logger.info("run %s: a new Job, not the warm trainer: the handoff patch was refused: %s", new_run, refused)
        return False
    pod = status["warm"].get(c.WARM_POD)
    message = f"run {new_run}: handed to the warm trainer pod {pod} of Job {name}; no new Job"
    kopf.event(body, type="Normal", reason=str(Reason.HANDED_OFF), message=message)
    logger.info(message)
    return True


def _create_children(body: kopf.Body, status: dict[str, Any], patch: kopf.Patch, children: list[dict[str, Any]],
                     logger: logging.Logger) -> bool:
    """Creates the run's children in order; True if the last (the Job) was created rather than adopted.
    An object of a child's name that this FinetuneJob does not control (pre-created by a user, or left by
    a user) is never taken over: the run fails before anything is made; one left by a deleted FinetuneJob
    of the same name is waited for, since the garbage collector removes it. A child the
    apiserver refuses (RBAC, quota, admission) fails it too, and what this attempt made is removed."""
    try:
        for child in children:
            kube.check_not_foreign(child)
    except kube.NotOwned as exc:
        if exc.leftover:
            raise kopf.TemporaryError(f"waiting for the garbage collector to remove {exc.kind} {exc.name!r}",
                                      delay=LEFTOVER_RETRY) from None
        _refuse(body, status, patch, Reason.CHILD_NOT_OWNED, str(exc), logger)
    made: list[dict[str, Any]] = []
    try:
        for child in children:
            if kube.create_child(child):
                made.append(child)
    except kube.NotOwned as exc:  # created by someone else since the check
        _remove(made)
        _refuse(body, status, patch, Reason.CHILD_NOT_OWNED, str(exc), logger)
    except ApiException as exc:
        if exc.status is None or not 400 <= exc.status < 500 or exc.status in (408, 429):
            raise  # the apiserver's own trouble: kopf retries
        _remove(made)
        meta = child["metadata"]
        _refuse(body, status, patch, Reason.CHILD_REJECTED,
                f"the apiserver refused to create {child['kind']} {meta['name']!r}: {kube.rejection_message(exc)}",
                logger)
    return bool(made) and made[-1] is children[-1]


def _remove(made: list[dict[str, Any]]) -> None:
    for child in reversed(made):
        kube.delete_child(child)


def _delete_job(namespace: str, name: str) -> None:
    try:
        kube.batch().delete_namespaced_job(name, namespace, propagation_policy="Background")
    except ApiException as exc:
        if exc.status != 404:
            raise


def _apply_in_place(body: kopf.Body, spec: FinetuneJobSpec, status: dict[str, Any], patch: kopf.Patch,
                    logger: logging.Logger) -> None:
    """Same run: only runPolicy.suspend may differ. Kueue owns unsuspending a queued Job."""
    namespace = body.metadata.namespace
    patch.status["observedGeneration"] = body.metadata.get("generation")
    job = kube.read_job(namespace, status.get("jobName") or "")
    if job is None or Phase(status.get("phase") or "Pending").finished:
        return
    want_suspend = lifecycle.suspend_change(spec.run_policy.suspend, bool(job["spec"].get("suspend")),
                                            spec.run_policy.queue_name)
    if want_suspend and (job["metadata"].get("labels") or {}).get(c.LABEL_RUN) != str(status.get("run")):
        _own_job(body, spec, status, patch, job, logger)
        return
    if want_suspend is not None:
        kube.batch().patch_namespaced_job(job["metadata"]["name"], namespace, {"spec": {"suspend": want_suspend}})
        reason = Reason.SUSPENDED if want_suspend else Reason.RESUMED
        kopf.event(body, type="Normal", reason=str(reason), message=f"Job {job['metadata']['name']} "
                   f"{'suspended' if want_suspend else 'resumed'}")
        logger.info("run %s %s", status.get("run"), "suspended" if want_suspend else "resumed")


def _own_job(body: kopf.Body, spec: FinetuneJobSpec, status: dict[str, Any], patch: kopf.Patch,
             warm_job: dict[str, Any], logger: logging.Logger) -> None:
    """Suspending a run handed to a warm trainer: the warm Job's pod template runs the earlier run, so a
    pod resumed from it would redo that one. The run gets its own Job (suspended, as asked; it resumes
    from its checkpoints), the status moves to it, then the warm Job goes."""
    namespace, name, run = body.metadata.namespace, body.metadata.name, int(status["run"])
    cm_name = builders.config_map_name(name, run)
    config_map = kube.read_or_none(kube.core().read_namespaced_config_map, cm_name, namespace)
    if config_map is None:
        raise kopf.TemporaryError(f"run {run}'s ConfigMap {cm_name!r} is missing", delay=LEFTOVER_RETRY)
    service_account = spec.resources.service_account_name or builders.trainer_account_name(name)
    job = builders.build_job(spec, dict(body), run, CONFIG, service_account=service_account,
                             raw_spec_hash=status["specHash"], live_jobs=metrics.live_jobs(),
                             config_digest=builders.config_sha256(config_map))
    _create_children(body, status, patch, [job], logger)
    new_name, warm_name = job["metadata"]["name"], warm_job["metadata"]["name"]
    # Moved first, so the warm Job's deletion is an earlier Job's to every reader of the status.
    ops = [{"op": "test", "path": "/status/jobName", "value": warm_name},
           {"op": "add", "path": "/status/jobName", "value": new_name}]
    ops += [{"op": "remove", "path": "/status/handoff"}] if status.get("handoff") else []
    refused = kube.patch_finetunejob_status_ops(namespace, name, ops)
    if refused:
        raise kopf.TemporaryError(f"moving run {run} to Job {new_name}: {refused}", delay=LEFTOVER_RETRY)
    _delete_job(namespace, warm_name)
    message = f"run {run}: suspended; it leaves the warm trainer of Job {warm_name} for its own Job {new_name}"
    kopf.event(body, type="Normal", reason=str(Reason.SUSPENDED), message=message)
    logger.info(message)


# ----------------------------------------------------------------------------- status


def _observe_ftj(ftj: dict[str, Any], job: dict[str, Any] | None, job_deleted: bool) -> Observation:
    status = ftj.get("status") or {}
    run = status["run"]
    if lifecycle.job_deleted(status, job, job_deleted):
        return lifecycle.deleted_observation(status)
    pods = kube.list_job_pods(ftj["metadata"]["namespace"], job["metadata"]["name"]) if job else []
    queue = ((job or {}).get("metadata", {}).get("labels") or {}).get(c.KUEUE_QUEUE_LABEL)
    suspend = bool(((ftj.get("spec") or {}).get("runPolicy") or {}).get("suspend"))
    refused = None
    if job and not pods and not (job.get("spec") or {}).get("suspend"):
        refused = kube.failed_create(ftj["metadata"]["namespace"], job["metadata"]["name"])
    warm = status.get("warm") or {}
    return observe(job, pods, status.get("progress"), run, lifecycle.queued(queue, suspend),
                   completion_reported(status, run), refused,
                   warm_until=warm.get(c.WARM_UNTIL) if warm.get(c.WARM_RUN) == run else None,
                   handed_off=(status.get("handoff") or {}).get(c.HANDOFF_RUN) == run)


# Runs whose Job has no pod yet. A Job that cannot create one (quota, admission) changes no condition
# and has no pod to watch, only FailedCreate Events: these are looked at again every few seconds. A
# thread, not a kopf timer, since a timer would put a finalizer on every FinetuneJob.
_NO_POD_YET: set[tuple[str, str]] = set()
_NO_POD_LOCK = threading.Lock()


def _no_pod_yet(key: tuple[str, str], waiting: bool) -> None:
    with _NO_POD_LOCK:
        (_NO_POD_YET.add if waiting else _NO_POD_YET.discard)(key)


def recheck_runs_without_a_pod() -> None:
    while True:
        time.sleep(POD_CREATE_RECHECK)
        with _NO_POD_LOCK:
            keys = sorted(_NO_POD_YET)
        for namespace, name in keys:
            try:
                ftj = kube.read_finetunejob(namespace, name)
                job_name = ((ftj or {}).get("status") or {}).get("jobName")
                if ftj is None or not job_name:
                    _no_pod_yet((namespace, name), False)
                    continue
                sync_status(ftj, kube.read_job(namespace, job_name))
            except ApiException as exc:  # the next round tries again
                LOG.warning("%s/%s: re-reading a run without a pod failed: %s %s", namespace, name,
                            exc.status, exc.reason)


def sync_status(ftj: dict[str, Any], job: dict[str, Any] | None, job_deleted: bool = False) -> None:
    meta, status = ftj["metadata"], dict(ftj.get("status") or {})
    key = (meta["namespace"], meta["name"])
    if not lifecycle.in_flight(status) or lifecycle.settled(status, job, job_deleted):
        _no_pod_yet(key, False)
        return
    obs = _observe_ftj(ftj, job, job_deleted)
    no_pod = job is not None and not (job.get("status") or {}).get("active")  # pending pods count as active
    _no_pod_yet(key, no_pod and obs.phase is Phase.PENDING and obs.reason in (Reason.POD_PENDING, Reason.POD_NOT_CREATED))
    if obs.reason == Reason.NO_COMPLETION_REPORT:
        # The event may predate the trainer's last patch: judge on the object as it is now.
        fresh = kube.read_finetunejob(meta["namespace"], meta["name"])
        if fresh is None or (fresh.get("status") or {}).get("jobName") != status.get("jobName"):
            return
        ftj, status = fresh, dict(fresh.get("status") or {})
        obs = _observe_ftj(ftj, job, job_deleted)
    # Conditions speak for the generation the run trains (ensure_run moves it on in-place edits).
    update = status_update(status, obs, status.get("observedGeneration"))
    if not update:
        return
    if lifecycle.abandon_job(obs) and job is not None:
        _delete_job(meta["namespace"], job["metadata"]["name"])  # it would wait for ever
    if not kube.patch_finetunejob_status(meta["namespace"], meta["name"], update, status["jobName"]):
        return  # judged on a view of a run that is no longer the object's
    if update.get("phase"):
        metrics.TRANSITIONS.labels(phase=obs.phase.value).inc()
        if obs.phase.finished and update.get("completionTime"):
            resources = (ftj.get("spec") or {}).get("resources") or {}
            gpus = status.get("gpus", resources.get("gpus", 1) * resources.get("nodes", 1))
            metrics.GPU_HOURS.labels(namespace=meta["namespace"]).inc(
                gpu_hours(status.get("startTime"), update["completionTime"], gpus))
        run = status.get("run")
        kind = "Normal"
        if lifecycle.warns(obs):  # the error counter counts Warning Events: one per transition
            kind = "Warning"
            metrics.ERRORS.labels(reason=str(obs.reason)).inc()
        kopf.event(ftj, type=kind, reason=obs.phase.value, message=f"run {run}: {obs.message}"[:1024])
        LOG.info("%s/%s run %s: %s (%s) %s", meta["namespace"], meta["name"], run, obs.phase.value, obs.reason,
                 obs.message[:200])


@kopf.on.event(*RESOURCE)
def finetunejob_event(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
    if event.get("type") == "DELETED":
        metrics.forget(body.metadata.namespace, body.metadata.name)
        return
    status = body.get("status") or {}
    job = kube.read_job(body.metadata.namespace, status["jobName"]) if status.get("jobName") else None
    sync_status(dict(body), job)
    metrics.observe_phase(body.metadata.namespace, body.metadata.name, (body.get("status") or {}).get("phase"))


@kopf.on.event("batch", "v1", "jobs", labels={c.LABEL_MANAGED_BY: c.MANAGED_BY})
def job_event(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
    owner = (body.metadata.get("labels") or {}).get(c.LABEL_JOB)
    if not owner:
        return
    ftj = kube.read_finetunejob(body.metadata.namespace, owner)
    if ftj is None or (ftj.get("status") or {}).get("jobName") != body.metadata.name:
        return  # an earlier run's Job, or its owner is gone
    deleted = event.get("type") == "DELETED"
    # The spec of the run the Job runs now: its own, or a later one's handed to its warm trainer.
    run_hash = (ftj.get("status") or {}).get("specHash") or (
        body.metadata.get("annotations") or {}).get(builders.SPEC_HASH_ANNOTATION)
    if deleted and run_hash != builders.spec_hash(ftj.get("spec") or {}):
        return  # superseded by a spec change: ensure_run deleted it on purpose
    sync_status(ftj, None if deleted else dict(body), job_deleted=deleted)


@kopf.on.event("", "v1", "pods", labels={c.LABEL_MANAGED_BY: c.MANAGED_BY})
def pod_event(body: kopf.Body, **_: Any) -> None:
    """A pod that cannot start (image pull, container config) changes no Job condition: watch pods too,
    so the status says why within seconds instead of waiting for a deadline."""
    labels = body.metadata.get("labels") or {}
    owner, job_name = labels.get(c.LABEL_JOB), labels.get("job-name")
    if not owner or not job_name:
        return
    ftj = kube.read_finetunejob(body.metadata.namespace, owner)
    if ftj is None or (ftj.get("status") or {}).get("jobName") != job_name:
        return
    sync_status(ftj, kube.read_job(body.metadata.namespace, job_name))
