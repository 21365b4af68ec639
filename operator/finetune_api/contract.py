"""What the operator and the trainer agree on: env vars, exit codes, labels and the progress channel.

Progress channel: the trainer patches its FinetuneJob's status subresource with a JSON Patch whose
first operation tests `/status/run` equals its own run number. The patch is atomic, so a trainer
from an older run can never overwrite a newer run's progress; it only ever touches `progress`,
`metrics` and `artifacts`, so the operator's fields are never clobbered. Its RBAC is a Role scoped
to that one object (resourceNames) with get/patch on finetunejobs/status. The operator mirrors
`progress.stage` into `phase` and conditions.
"""

from __future__ import annotations

from typing import Any

# --- environment of the training container (set by the operator's Job builder) ---
ENV_CONFIG = "FINETUNE_CONFIG"  # path of the mounted run.yaml
# Hex SHA-256 of run.yaml as the operator wrote it: a pod template cannot change once the Job exists,
# a ConfigMap can, so the trainer refuses a config that is not the one the operator wrote.
ENV_CONFIG_SHA256 = "FINETUNE_CONFIG_SHA256"
ENV_JOB_NAMESPACE = "FINETUNE_JOB_NAMESPACE"
ENV_JOB_NAME = "FINETUNE_JOB_NAME"
ENV_RUN = "FINETUNE_RUN"
ENV_TERMINATION_LOG = "FINETUNE_TERMINATION_LOG"  # = the container's terminationMessagePath
ENV_PROGRESS_INTERVAL = "FINETUNE_PROGRESS_INTERVAL"  # seconds between status reports (default 5)
ENV_SERVICEACCOUNT_DIR = "FINETUNE_SERVICEACCOUNT_DIR"  # default the in-cluster path below
ENV_WORKDIR = "FINETUNE_WORKDIR"  # scratch space (dataset, checkpoints, exports)
ENV_COMPILE_CACHE = "FINETUNE_COMPILE_CACHE"  # "off": no compile caches in S3 (Helm value security.compileCache)
DEFAULT_SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
CONFIG_MOUNT = "/etc/finetune/config"
DATASET_MOUNT = "/etc/finetune/dataset"  # dataset.configMapRef rows
ENV_DATASET_FILE = "FINETUNE_DATASET_FILE"
CONFIG_FILE = "run.yaml"
WORKDIR_MOUNT = "/workspace"
TERMINATION_LOG = "/dev/termination-log"

# --- trainer exit codes ---
EXIT_OK = 0
EXIT_CONFIG_ERROR = 42  # bad spec/data/credentials: the Job fails at once (podFailurePolicy FailJob)
EXIT_TRANSIENT = 75  # EX_TEMPFAIL: retried within backoffLimit, resuming from the newest checkpoint
# any other non-zero code is treated as transient too

# --- labels and annotations ---
LABEL_JOB = "finetune.dev/job"  # the FinetuneJob's name
LABEL_RUN = "finetune.dev/run"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "finetune-operator"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

# Field names in status the trainer owns.
TRAINER_STATUS_FIELDS = ("progress", "metrics", "artifacts", "warm")

# --- the warm trainer (runPolicy.keepWarmSeconds) ---
# A re-run after a spec edit pays the trainer's imports, model load and first-step compile again (Gemma 3
# 270M on an H100: 25.1 s outside training steps in a new pod, 10.5 s on a warm trainer). With keepWarmSeconds > 0 the trainer, its run
# reported, keeps its process (imports done, base model loaded, kernels compiled) for that long and
# says so in `status.warm` = {run, pod, until} (WARM_*). The operator hands it the next run in
# `status.handoff` = {run, configSha256, config} (HANDOFF_*: the next run's run.yaml as written into
# its ConfigMap) in one JSON Patch that first tests `/status/warm` is what it saw, and only where that
# run's Job would differ from the warm one in nothing but the run and its config. The trainer polls
# its FinetuneJob and takes a handoff for a later run whose config hashes to configSha256 and names
# this FinetuneJob (namespace, name, uid). It leaves by removing `/status/warm` in a patch that tests
# `/status/run` is still its own, so a handoff and its leaving cannot cross: whichever lands first wins.
ARG_KEEP_WARM = "--keep-warm"  # `finetune run --keep-warm SECONDS`
WARM_RUN, WARM_POD, WARM_UNTIL = "run", "pod", "until"
HANDOFF_RUN, HANDOFF_CONFIG_SHA256, HANDOFF_CONFIG = "run", "configSha256", "config"
# The operator hands off only while the warm trainer has at least this long left, so a trainer that is
# about to leave is replaced by a new Job instead.
HANDOFF_MIN_LEFT_SECONDS = 30
ENV_POD_NAME = "FINETUNE_POD_NAME"  # the downward API's metadata.name: the warm trainer says which pod it is


def progress_patch(run: int, **fields: Any) -> list[dict[str, Any]]:
    """JSON Patch for the status subresource, applied only if `/status/run` is still `run`."""
    unknown = set(fields) - set(TRAINER_STATUS_FIELDS)
    if unknown:
        raise ValueError(f"the trainer may not write status fields {sorted(unknown)}")
    ops: list[dict[str, Any]] = [{"op": "test", "path": "/status/run", "value": run}]
    ops += [{"op": "add", "path": f"/status/{k}", "value": v} for k, v in fields.items()]
    return ops


def leave_warm_patch(run: int) -> list[dict[str, Any]]:
    """JSON Patch a warm trainer of `run` leaves with: fails (the test) once the operator handed it a later
    run (which removed `/status/warm` and moved `/status/run` on)."""
    return [{"op": "test", "path": "/status/run", "value": run}, {"op": "remove", "path": "/status/warm"}]


def take_handoff_patch(run: int) -> list[dict[str, Any]]:
    """JSON Patch the warm trainer takes the handoff of `run` with: the config leaves the status."""
    return [{"op": "test", "path": "/status/run", "value": run}, {"op": "remove", "path": "/status/handoff"}]


def handoff_patch(warm: dict[str, Any], run: int, config_yaml: str, config_sha256: str,
                  fields: dict[str, Any], seen: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """JSON Patch the operator hands run `run` to the warm trainer `warm` with: fails (the test) once the
    trainer has left. `fields`: the operator's own status fields of the new run (phase, run, jobName...),
    each set whole; None clears a field: removed where `seen` (the status the operator read) has it,
    since the schema takes no null and JSON Patch cannot remove what is absent."""
    seen = seen or {}
    ops: list[dict[str, Any]] = [{"op": "test", "path": "/status/warm", "value": warm},
                                 {"op": "remove", "path": "/status/warm"}]
    for k, v in fields.items():
        if v is not None:
            ops.append({"op": "add", "path": f"/status/{k}", "value": v})
        elif seen.get(k) is not None:
            ops.append({"op": "remove", "path": f"/status/{k}"})
    ops.append({"op": "add", "path": "/status/handoff", "value": {
        HANDOFF_RUN: run, HANDOFF_CONFIG_SHA256: config_sha256, HANDOFF_CONFIG: config_yaml}})
    return ops
