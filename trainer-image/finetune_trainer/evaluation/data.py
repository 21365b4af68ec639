"""Where offline task definitions come from: EvaluationSpec.dataUri (a local folder or an s3:// prefix),
else the local task library (the offline MMLU that hack/bootstrap.sh builds, see mmlu.py).

The folder holds lm-eval task YAML files (found recursively, as ``--include_path`` does) and their
data. A task reads its data with ``dataset_path: json`` and ``dataset_kwargs.data_files``; relative
``data_files`` are resolved against the folder's root (lm-eval runs with the root as its working
directory while it loads the tasks), so the same folder works wherever it is copied to.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from finetune_api.status import Reason

from ..errors import ConfigError
from ..paths import cache_dir

log = logging.getLogger(__name__)

# A task folder used when the spec names no dataUri; default: <cache>/lm-eval-tasks (paths.cache_dir),
# where hack/bootstrap.sh builds the offline MMLU.
ENV_TASK_LIBRARY = "FINETUNE_EVAL_TASKS"


def task_library() -> Path | None:
    """The local task library folder, or None when there is none."""
    configured = os.environ.get(ENV_TASK_LIBRARY)
    path = Path(configured).expanduser() if configured else cache_dir() / "lm-eval-tasks"
    return path.resolve() if path.is_dir() and any(path.rglob("*.yaml")) else None


def store_from_env():
    """The trainer's S3 layer (s3.py) for a dataUri when no run spec gives one (`finetune eval` on its own):
    the endpoint from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, path-style there (SeaweedFS, MinIO and Ceph
    need it), credentials from the environment or the pod's identity, never the spec."""
    from finetune_api.spec import S3Spec

    from ..storage.s3 import S3Store

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return S3Store(S3Spec(endpoint=endpoint, force_path_style=bool(endpoint)))


def resolve_task_dir(data_uri: str | None, workdir: Path, store: Any = None) -> Path | None:
    """The local folder of task YAMLs for ``data_uri`` (downloaded under ``workdir`` with ``store``, an
    S3Store, when s3://); without a ``data_uri``, the local task library if there is one."""
    if not data_uri:
        return task_library()
    if data_uri.startswith("s3://"):
        dest = (workdir / "eval-tasks").resolve()
        shutil.rmtree(dest, ignore_errors=True)  # no stale task files from an earlier attempt
        written = (store or store_from_env()).download_prefix(data_uri, dest)
        if not written:
            raise ConfigError(Reason.OBJECT_NOT_FOUND, f"evaluation.dataUri: no objects under {data_uri}")
        log.info("downloaded %d task files from %s", len(written), data_uri)
        return dest
    path = Path(data_uri).expanduser()
    if not path.is_dir():
        raise ConfigError(Reason.OBJECT_NOT_FOUND, f"evaluation.dataUri {data_uri} is not a folder")
    if not any(path.rglob("*.yaml")):
        raise ConfigError(Reason.OBJECT_NOT_FOUND, f"evaluation.dataUri {data_uri} holds no task *.yaml file")
    return path.resolve()
