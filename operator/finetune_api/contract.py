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
TRAINER_STATUS_FIELDS = ("progress", "metrics", "artifacts")


def progress_patch(run: int, **fields: Any) -> list[dict[str, Any]]:
    """JSON Patch for the status subresource, applied only if `/status/run` is still `run`."""
    unknown = set(fields) - set(TRAINER_STATUS_FIELDS)
    if unknown:
        raise ValueError(f"the trainer may not write status fields {sorted(unknown)}")
    ops: list[dict[str, Any]] = [{"op": "test", "path": "/status/run", "value": run}]
    ops += [{"op": "add", "path": f"/status/{k}", "value": v} for k, v in fields.items()]
    return ops
