"""Thin wrappers over the Kubernetes client: idempotent create, reads that return None on 404, and the
one rate limit every status write of the operator (FinetuneJobs and FinetuneSweeps) goes through."""

from __future__ import annotations

from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from finetune_api import GROUP, PLURAL, SWEEP_PLURAL, VERSION

from . import metrics
from .ratelimit import TokenBucket

_api: kubernetes.client.ApiClient | None = None
_status_writes: TokenBucket | None = None  # limit_status_writes sets it as the operator starts


def api() -> kubernetes.client.ApiClient:
    global _api
    if _api is None:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        _api = kubernetes.client.ApiClient()
    return _api


def reset() -> None:
    """Forget the client (tests point the operator at a fresh cluster)."""
    global _api
    _api = None


def core() -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api())


def batch() -> kubernetes.client.BatchV1Api:
    return kubernetes.client.BatchV1Api(api())


def rbac() -> kubernetes.client.RbacAuthorizationV1Api:
    return kubernetes.client.RbacAuthorizationV1Api(api())


def custom() -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api())


def to_dict(obj: Any) -> dict[str, Any]:
    return api().sanitize_for_serialization(obj)


def read_or_none(fn, *args, **kw) -> dict[str, Any] | None:
    try:
        return to_dict(fn(*args, **kw))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def create_if_absent(create_fn, namespace: str, body: dict[str, Any]) -> bool:
    """Creates `body`; an existing object of that name (a restart's leftover) is kept. True if created.
    Only for objects that are not a FinetuneJob's children (those go through create_child)."""
    try:
        create_fn(namespace, body)
        return True
    except ApiException as exc:
        if exc.status == 409:
            return False
        raise


# The children of a run, by kind: (API group client, the client's name for the kind).
_CHILD_APIS = {
    "Role": (rbac, "role"), "RoleBinding": (rbac, "role_binding"), "ServiceAccount": (core, "service_account"),
    "ConfigMap": (core, "config_map"), "Service": (core, "service"), "Job": (batch, "job"),
}


class NotOwned(Exception):
    """An object has the name of a child to create, and the child's owner is not its controller."""

    def __init__(self, kind: str, name: str, owners: list[dict[str, Any]], owner: dict[str, Any]):
        self.kind, self.name = kind, name
        # A child of a deleted FinetuneJob of the same name (another uid): garbage collection removes it.
        self.leftover = any(o.get("controller") and o.get("kind") == owner["kind"] and o.get("name") == owner["name"]
                            for o in owners)
        named = ", ".join(f"{o.get('kind')} {o.get('name')!r}" for o in owners if o.get("controller"))
        super().__init__(f"{kind} {name!r} already exists and this FinetuneJob is not its controller "
                         f"({'it is controlled by ' + named if named else 'it has no controller'}); the operator "
                         f"never takes over an object it did not create: delete or rename it, then change the spec")


def controlled_by(obj: dict[str, Any], uid: str) -> bool:
    """Whether `obj`'s controller ownerReference is the object with `uid`."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


def _controller(body: dict[str, Any]) -> dict[str, Any]:
    return next(ref for ref in body["metadata"]["ownerReferences"] if ref.get("controller"))


def read_child(body: dict[str, Any]) -> dict[str, Any] | None:
    group, kind = _CHILD_APIS[body["kind"]]
    meta = body["metadata"]
    return read_or_none(getattr(group(), f"read_namespaced_{kind}"), meta["name"], meta["namespace"])


def check_not_foreign(body: dict[str, Any]) -> None:
    """Raises NotOwned if an object of `body`'s name exists that `body`'s controller does not control."""
    existing = read_child(body)
    owner = _controller(body)
    if existing is not None and not controlled_by(existing, owner["uid"]):
        raise NotOwned(body["kind"], body["metadata"]["name"], existing["metadata"].get("ownerReferences") or [],
                       owner)


def create_child(body: dict[str, Any]) -> bool:
    """Creates a child of a FinetuneJob (`body` names it as controller). An existing object of that name
    is adopted only if that same FinetuneJob (by uid) controls it, a restart's leftover; anything else
    (made by a user, or by a deleted FinetuneJob of the same name) raises NotOwned. True if created."""
    group, kind = _CHILD_APIS[body["kind"]]
    meta = body["metadata"]
    try:
        getattr(group(), f"create_namespaced_{kind}")(meta["namespace"], body)
        return True
    except ApiException as exc:
        if exc.status != 409:
            raise
    check_not_foreign(body)
    return False


def delete_child(body: dict[str, Any]) -> None:
    """Deletes a child made by this attempt (its pods, if a Job, in the background); gone already is fine."""
    group, kind = _CHILD_APIS[body["kind"]]
    meta = body["metadata"]
    try:
        getattr(group(), f"delete_namespaced_{kind}")(meta["name"], meta["namespace"],
                                                     propagation_policy="Background")
    except ApiException as exc:
        if exc.status != 404:
            raise


def read_job(namespace: str, name: str) -> dict[str, Any] | None:
    return read_or_none(batch().read_namespaced_job, name, namespace)


def list_job_pods(namespace: str, job: str) -> list[dict[str, Any]]:
    pods = core().list_namespaced_pod(namespace, label_selector=f"job-name={job}")
    return [to_dict(p) for p in pods.items]


def failed_create(namespace: str, job: str) -> str | None:
    """The message of the Job's newest FailedCreate Event (the Job controller could not create a pod:
    quota, admission), or None. It changes no Job condition, so only its Events tell."""
    events = core().list_namespaced_event(
        namespace, field_selector=f"involvedObject.kind=Job,involvedObject.name={job},reason=FailedCreate")
    newest = max(events.items, default=None,
                 key=lambda e: str(e.last_timestamp or e.event_time or e.metadata.creation_timestamp or ""))
    if newest is None:
        return None
    return (newest.message or "").strip() or None


def read_finetunejob(namespace: str, name: str) -> dict[str, Any] | None:
    return read_or_none(custom().get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)


def limit_status_writes(per_second: float) -> None:
    global _status_writes
    _status_writes = TokenBucket(per_second)


def status_write_slot() -> None:
    """Waits for the rate limit's next token (handlers run in worker threads): waiting is better than
    dropping, which could leave a stale phase; status is level-derived, so a late write is never wrong."""
    if _status_writes is not None:
        metrics.STATUS_WRITE_WAIT.inc(_status_writes.acquire())


def patch_sweep_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    status_write_slot()
    custom().patch_namespaced_custom_object_status(GROUP, VERSION, namespace, SWEEP_PLURAL, name, {"status": status})


def patch_finetunejob_status(namespace: str, name: str, status: dict[str, Any], job_name: str) -> bool:
    """Writes what was derived from run `job_name`, only if that run is still the object's (a JSON Patch
    whose first operation tests /status/jobName): a view of the object read before ensure_run started
    another run, or stopped this one, can never write over it. False when the run moved on."""
    ops = [{"op": "test", "path": "/status/jobName", "value": job_name}]
    ops += [{"op": "add", "path": f"/status/{key}", "value": value} for key, value in status.items()]
    # Gone, or the test failed: another run owns the status now.
    return patch_finetunejob_status_ops(namespace, name, ops, refused=(404, 422)) is None


def patch_finetunejob_status_ops(namespace: str, name: str, ops: list[dict[str, Any]],
                                 refused: tuple[int, ...] = (404, 409, 422)) -> str | None:
    """One JSON Patch on the status subresource: None once applied, else why the apiserver refused it
    with one of `refused` (a test operation failed: 422, a conflict: 409, or the object is gone: 404)."""
    status_write_slot()
    try:
        custom().patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, ops,
                                                       _content_type="application/json-patch+json")
        return None
    except ApiException as exc:
        if exc.status in refused:
            return f"HTTP {exc.status}: {rejection_message(exc)}"
        raise


def dry_run_create_job(namespace: str, body: dict[str, Any]) -> str | None:
    """The apiserver's own verdict on a Job before anything of the run exists: None if it would be
    accepted (or already exists), else its message (quantities, tolerations, affinity, names...)."""
    try:
        batch().create_namespaced_job(namespace, body, dry_run="All")
        return None
    except ApiException as exc:
        if exc.status in (400, 422):
            return rejection_message(exc)
        if exc.status == 409:  # a restart finds the Job it created: adopt it
            return None
        raise


def rejection_message(exc: ApiException) -> str:
    """The field-level message of a 4xx Status, without the client's HTTP dump."""
    import json

    try:
        status = json.loads(exc.body or "{}")
    except ValueError:
        return f"HTTP {exc.status} {exc.reason}"
    causes = (status.get("details") or {}).get("causes") or []
    if causes:
        return "; ".join(f"{c.get('field', '')}: {c.get('message', '')}".strip(": ") for c in causes)[:2000]
    return str(status.get("message") or f"HTTP {exc.status} {exc.reason}")[:2000]
