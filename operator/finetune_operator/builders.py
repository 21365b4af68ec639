"""Pure functions that build the objects of one run: no API calls, unit-testable without a cluster.

Every child is owned by its FinetuneJob (garbage-collected with it) and has a deterministic name,
so a restarted operator finds what it already created instead of duplicating it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from finetune_api import API_VERSION, KIND, RunConfig, RunRef
from finetune_api import contract as c
from finetune_api.egress import EgressPolicy
from finetune_api.spec import FinetuneJobSpec, S3CredentialsRef, Toleration

from .config import OperatorConfig

CONTAINER = "trainer"
SPEC_HASH_ANNOTATION = "finetune.dev/spec-hash"
HANDOFF_IDENTITY_ANNOTATION = "finetune.dev/handoff-identity"  # handoff_identity of the Job as built
TRAINER_UID = 1000
RENDEZVOUS_PORT = 29500  # torchrun's c10d store, served by the agent on pod 0
# How long torchrun waits for every pod to join: pods of one Job may start minutes apart (image pulls).
RENDEZVOUS_JOIN_TIMEOUT = 1800


def job_name(name: str, run: int) -> str:
    return f"{name}-r{run}"


def config_map_name(name: str, run: int) -> str:
    return f"{name}-r{run}-config"


def service_name(name: str, run: int) -> str:
    """The headless Service of a multi-pod run: pod i is reachable as <job>-<i>.<service>."""
    return job_name(name, run)


def trainer_account_name(name: str) -> str:
    return f"{name}-trainer"


def spec_hash(raw_spec: dict[str, Any]) -> str:
    """Identity of a run: the applied spec minus the fields that steer a run without changing it."""
    spec = copy.deepcopy(raw_spec)
    policy = spec.get("runPolicy") or {}
    policy.pop("suspend", None)
    if not policy:  # `runPolicy: {suspend: false}` is the same run as no runPolicy at all
        spec.pop("runPolicy", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def resolve_spec(raw_spec: dict[str, Any], cfg: OperatorConfig) -> FinetuneJobSpec:
    """Validates the applied spec and fills in operator-level defaults (never written back to the object)."""
    spec = FinetuneJobSpec.model_validate(raw_spec)
    res = spec.resources
    if "gpu_resource_name" not in res.model_fields_set:
        res.gpu_resource_name = cfg.default_gpu_resource
    if res.node_selector is None and cfg.default_node_selector:
        res.node_selector = dict(cfg.default_node_selector)
    if res.tolerations is None and cfg.default_tolerations:
        res.tolerations = [Toleration.model_validate(t) for t in cfg.default_tolerations]
    if spec.run_policy.queue_name is None and cfg.default_queue_name:
        spec.run_policy.queue_name = cfg.default_queue_name
    s3 = spec.output.s3
    if s3.endpoint is None and cfg.default_s3_endpoint:
        s3.endpoint = cfg.default_s3_endpoint
    if s3.bucket is None:
        if not cfg.default_s3_bucket:
            raise ValueError("spec.output.s3.bucket: required, since the operator has no default bucket")
        s3.bucket = cfg.default_s3_bucket
    if s3.credentials_secret_ref is None and cfg.default_s3_credentials_secret:
        s3.credentials_secret_ref = S3CredentialsRef(name=cfg.default_s3_credentials_secret)
    return spec


def labels(name: str, run: int | None = None) -> dict[str, str]:
    out = {c.LABEL_JOB: name, c.LABEL_MANAGED_BY: c.MANAGED_BY}
    if run is not None:
        out[c.LABEL_RUN] = str(run)
    return out


def owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    meta = owner["metadata"]
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def _meta(name: str, owner: dict[str, Any], run: int | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": owner["metadata"]["namespace"], "labels": labels(owner["metadata"]["name"], run),
            "ownerReferences": [owner_reference(owner)], **extra}


def build_run_config(spec: FinetuneJobSpec, owner: dict[str, Any], run: int,
                     egress: EgressPolicy | None = None) -> RunConfig:
    meta = owner["metadata"]
    ref = RunRef(namespace=meta["namespace"], name=meta["name"], uid=meta.get("uid"),
                 generation=meta.get("generation"), run=run)
    return RunConfig.build(spec, ref, egress)


def build_config_map(run_config: RunConfig, owner: dict[str, Any]) -> dict[str, Any]:
    name = owner["metadata"]["name"]
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": _meta(config_map_name(name, run_config.job.run), owner, run_config.job.run),
        "data": {c.CONFIG_FILE: run_config.to_yaml()},
    }


def config_sha256(config_map: dict[str, Any]) -> str:
    """Hex SHA-256 of the run config as written into its ConfigMap. The Job's pod template carries it
    (ENV_CONFIG_SHA256), which nobody can change once the Job exists; a ConfigMap can be edited by
    anyone with `edit`, so the trainer refuses a config whose hash differs (dropping the egress rule, say)."""
    return hashlib.sha256(config_map["data"][c.CONFIG_FILE].encode()).hexdigest()


def build_service_account(owner: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": _meta(trainer_account_name(owner["metadata"]["name"]), owner)}


def build_role(owner: dict[str, Any]) -> dict[str, Any]:
    """The trainer may read its own FinetuneJob and patch its status: that one object, nothing else."""
    name = owner["metadata"]["name"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": _meta(trainer_account_name(name), owner),
        "rules": [
            {"apiGroups": ["finetune.dev"], "resources": ["finetunejobs"], "resourceNames": [name], "verbs": ["get"]},
            {"apiGroups": ["finetune.dev"], "resources": ["finetunejobs/status"], "resourceNames": [name],
             "verbs": ["get", "patch"]},
        ],
    }


def build_role_binding(owner: dict[str, Any], service_account: str) -> dict[str, Any]:
    name = trainer_account_name(owner["metadata"]["name"])
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": _meta(name, owner),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": owner["metadata"]["namespace"]}],
    }


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def progress_interval(cfg: OperatorConfig, live_jobs: int) -> int:
    """Seconds between one trainer's reports, so that all live trainers together stay within
    cfg.progress_reports_per_second (never faster than the configured interval)."""
    return max(cfg.progress_interval_seconds, -(-live_jobs // max(1, int(cfg.progress_reports_per_second))))


def build_env(spec: FinetuneJobSpec, owner: dict[str, Any], run: int, cfg: OperatorConfig,
              live_jobs: int = 0, config_digest: str | None = None) -> list[dict[str, Any]]:
    meta = owner["metadata"]
    env = [
        {"name": c.ENV_CONFIG, "value": f"{c.CONFIG_MOUNT}/{c.CONFIG_FILE}"},
        {"name": c.ENV_JOB_NAMESPACE, "value": meta["namespace"]},
        {"name": c.ENV_JOB_NAME, "value": meta["name"]},
        {"name": c.ENV_RUN, "value": str(run)},
        {"name": c.ENV_WORKDIR, "value": c.WORKDIR_MOUNT},
        {"name": c.ENV_TERMINATION_LOG, "value": c.TERMINATION_LOG},
        {"name": c.ENV_PROGRESS_INTERVAL, "value": str(progress_interval(cfg, live_jobs))},
        # Caches live in the scratch volume: the image's home may be read-only.
        {"name": "HOME", "value": c.WORKDIR_MOUNT},
        {"name": "HF_HOME", "value": f"{c.WORKDIR_MOUNT}/.cache/huggingface"},
        {"name": "UNSLOTH_DISABLE_STATISTICS", "value": "1"},
        {"name": c.ENV_COMPILE_CACHE, "value": "on" if cfg.compile_cache else "off"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if spec.run_policy.keep_warm_seconds:  # the warm trainer names its pod in status.warm
        env.append({"name": c.ENV_POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    if config_digest:
        env.append({"name": c.ENV_CONFIG_SHA256, "value": config_digest})
    # Credentials only ever travel as Secret references; the operator never reads their values.
    s3 = spec.output.s3
    if s3.credentials_secret_ref:
        ref = s3.credentials_secret_ref
        env.append(_secret_env("AWS_ACCESS_KEY_ID", ref.name, ref.access_key_id_key))
        env.append(_secret_env("AWS_SECRET_ACCESS_KEY", ref.name, ref.secret_access_key_key))
    if spec.base_model.token_secret_ref:
        ref = spec.base_model.token_secret_ref
        env.append(_secret_env("HF_TOKEN", ref.name, ref.key))
    if spec.dataset.config_map_ref:
        env.append({"name": c.ENV_DATASET_FILE, "value": f"{c.DATASET_MOUNT}/{spec.dataset.config_map_ref.key}"})
    return env


def build_resources(spec: FinetuneJobSpec) -> dict[str, Any]:
    res = spec.resources
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    if res.gpus:
        limits[res.gpu_resource_name] = str(res.gpus)
    if res.cpu:
        requests["cpu"] = limits["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = limits["memory"] = res.memory
    out: dict[str, Any] = {}
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


def build_service(spec: FinetuneJobSpec, owner: dict[str, Any], run: int) -> dict[str, Any]:
    """Headless, so each pod of the Indexed Job gets a DNS name (the JobSet / Kubeflow Trainer pattern);
    addresses are published before pods are ready, since the rendezvous is what makes them ready."""
    name = owner["metadata"]["name"]
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(service_name(name, run), owner, run),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": labels(name, run),
                 "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}]},
    }


def build_command(spec: FinetuneJobSpec, name: str, run: int) -> list[str]:
    """`finetune run`, or with several processes the same under torchrun (finetune_trainer.launch is
    torchrun itself, passing a configuration error's exit code on to the Job's podFailurePolicy)."""
    trainer = ["run", "--config", f"{c.CONFIG_MOUNT}/{c.CONFIG_FILE}", "--workdir", c.WORKDIR_MOUNT, "--resume"]
    res = spec.resources
    if res.world_size == 1:
        warm = spec.run_policy.keep_warm_seconds
        return ["finetune", *trainer, *([c.ARG_KEEP_WARM, str(warm)] if warm else [])]
    launch = ["python", "-m", "finetune_trainer.launch", "--nproc-per-node", str(res.processes_per_node),
              "--max-restarts", "0"]  # a failed process fails the attempt; the Job retries, resuming
    if res.nodes == 1:
        launch += ["--standalone"]
    else:
        host = f"{job_name(name, run)}-0.{service_name(name, run)}"
        launch += ["--nnodes", str(res.nodes), "--rdzv-backend", "c10d", "--rdzv-id", job_name(name, run),
                   "--rdzv-endpoint", f"{host}:{RENDEZVOUS_PORT}",
                   "--rdzv-conf", f"join_timeout={RENDEZVOUS_JOIN_TIMEOUT}"]
    return [*launch, "-m", "finetune_trainer", *trainer]


def build_pod_spec(spec: FinetuneJobSpec, owner: dict[str, Any], run: int, cfg: OperatorConfig,
                   service_account: str, live_jobs: int = 0, config_digest: str | None = None) -> dict[str, Any]:
    name = owner["metadata"]["name"]
    res = spec.resources
    mounts = [
        {"name": "config", "mountPath": c.CONFIG_MOUNT, "readOnly": True},
        {"name": "workspace", "mountPath": c.WORKDIR_MOUNT},
        {"name": "dshm", "mountPath": "/dev/shm"},  # dataloader workers and NCCL need more than 64 MiB
        {"name": "tmp", "mountPath": "/tmp"},  # the root filesystem is read-only; Inductor and tempfile use /tmp
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map_name(name, run)}},
        {"name": "workspace", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if spec.dataset.config_map_ref:
        ref = spec.dataset.config_map_ref
        mounts.append({"name": "dataset", "mountPath": c.DATASET_MOUNT, "readOnly": True})
        volumes.append({"name": "dataset", "configMap": {"name": ref.name, "items": [{"key": ref.key, "path": ref.key}]}})
    container = {
        "name": CONTAINER,
        "image": res.image or cfg.trainer_image,
        "imagePullPolicy": res.image_pull_policy or cfg.image_pull_policy,
        "command": build_command(spec, name, run),
        "env": build_env(spec, owner, run, cfg, live_jobs, config_digest),
        "resources": build_resources(spec),
        "volumeMounts": mounts,
        "terminationMessagePath": c.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": TRAINER_UID, "runAsGroup": TRAINER_UID,
            # Writes go to the workspace, /tmp and /dev/shm volumes only (HOME and every cache are there).
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # retries are the Job's, so podFailurePolicy can see exit codes
        "serviceAccountName": service_account,
        "securityContext": {"runAsNonRoot": True, "fsGroup": TRAINER_UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        # Long enough for the trainer to save a checkpoint on SIGTERM (preemption, suspend).
        "terminationGracePeriodSeconds": 120,
        "containers": [container],
        "volumes": volumes,
    }
    if res.nodes > 1:
        pod["subdomain"] = service_name(name, run)  # with the Indexed Job's hostname <job>-<index>
    if res.node_selector:
        pod["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod["tolerations"] = [t.wire() for t in res.tolerations]
    if res.affinity:
        pod["affinity"] = res.affinity
    if res.priority_class_name:
        pod["priorityClassName"] = res.priority_class_name
    return pod


def build_job(spec: FinetuneJobSpec, owner: dict[str, Any], run: int, cfg: OperatorConfig, *,
              service_account: str, raw_spec_hash: str, live_jobs: int = 0,
              config_digest: str | None = None) -> dict[str, Any]:
    """config_digest: config_sha256 of the run's ConfigMap, which the trainer checks its config against."""
    name = owner["metadata"]["name"]
    policy = spec.run_policy
    meta = _meta(job_name(name, run), owner, run, annotations={SPEC_HASH_ANNOTATION: raw_spec_hash})
    if policy.queue_name:
        meta["labels"][c.KUEUE_QUEUE_LABEL] = policy.queue_name
    nodes = spec.resources.nodes
    job_spec: dict[str, Any] = {
        # A failed attempt of a multi-pod run usually fails every pod (the others lose their peer).
        "backoffLimit": policy.backoff_limit * nodes,
        # Kueue admits a queued Job by unsuspending it; otherwise suspend follows runPolicy.suspend.
        "suspend": bool(policy.suspend or policy.queue_name),
        "podFailurePolicy": {"rules": [
            # A configuration error will fail the same way on every retry: fail the Job at once.
            {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                  "values": [c.EXIT_CONFIG_ERROR]}},
            # Preemption and node drains are not the trainer's fault: don't count them against backoffLimit.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]},
        "template": {
            "metadata": {"labels": labels(name, run)},
            "spec": build_pod_spec(spec, owner, run, cfg, service_account, live_jobs, config_digest),
        },
    }
    if nodes > 1:  # pod i is torchrun node i; all of them run at once
        job_spec.update({"completionMode": "Indexed", "completions": nodes, "parallelism": nodes})
    if policy.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    if policy.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}
    if policy.keep_warm_seconds:
        meta["annotations"][HANDOFF_IDENTITY_ANNOTATION] = handoff_identity(job)
    return job


# ----------------------------------------------------------------------------- handing a run to a warm trainer

# What may differ between the warm Job and the Job of the run handed to it: the run's number and its
# config (the trainer reads both from the handoff, not its env), and the report interval (a pacing hint
# that follows the number of live Jobs).
_RUN_ENV = frozenset({c.ENV_RUN, c.ENV_CONFIG_SHA256, c.ENV_PROGRESS_INTERVAL})


def _handoff_form(job: dict[str, Any]) -> dict[str, Any]:
    """`job` with what legitimately differs between runs taken out."""
    job = copy.deepcopy(job)
    job.pop("status", None)
    meta = job.get("metadata") or {}
    job["metadata"] = {"labels": {k: v for k, v in (meta.get("labels") or {}).items() if k != c.LABEL_RUN}}
    template = (job.get("spec") or {}).get("template") or {}
    tmeta = template.get("metadata") or {}
    if "labels" in tmeta:
        tmeta["labels"] = {k: v for k, v in tmeta["labels"].items() if k != c.LABEL_RUN}
    pod = template.get("spec") or {}
    for container in pod.get("containers") or []:
        if "env" in container:
            container["env"] = [e for e in container["env"] if e.get("name") not in _RUN_ENV]
    for volume in pod.get("volumes") or []:
        if volume.get("name") == "config" and "configMap" in volume:
            volume["configMap"] = {**volume["configMap"], "name": "<the run's config>"}
    return job


def handoff_identity(job: dict[str, Any]) -> str:
    """Identity of a built Job apart from its run (`_handoff_form`): two Jobs with the same one run the
    same pod, so the warm trainer of one may take the other's run. Stamped on the Job as it is built,
    since the apiserver adds defaults to what it stores."""
    return hashlib.sha256(json.dumps(_handoff_form(job), sort_keys=True).encode()).hexdigest()[:16]


def _first_difference(built: Any, stored: Any, path: str) -> str | None:
    """Where `stored` differs from `built` in what `built` sets (the apiserver's defaults are extra keys)."""
    if isinstance(built, dict) and isinstance(stored, dict):
        for key, value in built.items():
            found = _first_difference(value, stored.get(key), f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(built, list) and isinstance(stored, list) and len(built) == len(stored):
        for i, (a, b) in enumerate(zip(built, stored, strict=True)):
            found = _first_difference(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if built == stored else path.lstrip(".")


def handoff_blocker(warm_job: dict[str, Any], new_job: dict[str, Any]) -> str | None:
    """Why the run of `new_job` (as built) cannot go to the warm trainer of `warm_job` (as stored), or None
    when the two differ in nothing but the run and its config. A short reason, for a log line and Event."""
    name = warm_job["metadata"]["name"]
    stamped = (warm_job["metadata"].get("annotations") or {}).get(HANDOFF_IDENTITY_ANNOTATION)
    if not stamped:
        return f"Job {name} carries no {HANDOFF_IDENTITY_ANNOTATION}"
    if (warm_job.get("spec") or {}).get("activeDeadlineSeconds"):
        # The deadline counts from the warm Job's start: the next run would get only what is left of it.
        return f"Job {name} has an activeDeadlineSeconds"
    if stamped == handoff_identity(new_job):
        return None
    where = _first_difference(_handoff_form(new_job), _handoff_form(warm_job), "")
    return f"the new run's Job would differ from Job {name} in {where or 'a field it no longer sets'}"
