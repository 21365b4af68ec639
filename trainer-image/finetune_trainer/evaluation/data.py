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
from pathlib import Path, PurePosixPath
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


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix/"); the prefix always ends with "/" or is empty."""
    if not uri.startswith("s3://"):
        raise ConfigError(Reason.INVALID_URI, f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ConfigError(Reason.INVALID_URI, f"no bucket in {uri!r}")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def s3_client(endpoint_url: str | None = None):
    """A boto3 S3 client. Credentials come from the environment (or the pod's identity), never the spec.

    The endpoint is ``endpoint_url``, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (read by boto3).
    A custom endpoint gets path-style addressing, which SeaweedFS, MinIO and Ceph need.
    """
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(s3={"addressing_style": "path"}) if endpoint else None
    return boto3.client("s3", endpoint_url=endpoint, config=config)


def download_prefix(uri: str, dest: Path, client: Any = None) -> list[Path]:
    """Copy every object under an s3:// prefix into ``dest``, keeping the key layout below the prefix."""
    from ..s3 import classify

    bucket, prefix = split_s3_uri(uri)
    client = client or s3_client()
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    written: list[Path] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                rel = PurePosixPath(key[len(prefix):])
                if key.endswith("/") or not rel.parts:
                    continue  # "folder" marker objects
                if rel.is_absolute() or ".." in rel.parts:
                    raise ConfigError(Reason.PATH_NOT_ALLOWED, f"refusing object key outside the prefix: {key!r}")
                target = root.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, key, str(target))
                written.append(target)
    except Exception as exc:  # noqa: BLE001 - S3's failures, classified as the rest of the trainer's
        raise classify(exc, f"evaluation.dataUri {uri}") from exc
    if not written:
        raise ConfigError(Reason.OBJECT_NOT_FOUND, f"evaluation.dataUri: no objects under {uri}")
    log.info("downloaded %d task files from %s", len(written), uri)
    return written


def resolve_task_dir(data_uri: str | None, workdir: Path, client: Any = None) -> Path | None:
    """The local folder of task YAMLs for ``data_uri`` (downloaded under ``workdir`` when s3://);
    without a ``data_uri``, the local task library if there is one."""
    if not data_uri:
        return task_library()
    if data_uri.startswith("s3://"):
        dest = (workdir / "eval-tasks").resolve()
        shutil.rmtree(dest, ignore_errors=True)  # no stale task files from an earlier attempt
        download_prefix(data_uri, dest, client)
        return dest
    path = Path(data_uri).expanduser()
    if not path.is_dir():
        raise ConfigError(Reason.OBJECT_NOT_FOUND, f"evaluation.dataUri {data_uri} is not a folder")
    if not any(path.rglob("*.yaml")):
        raise ConfigError(Reason.OBJECT_NOT_FOUND, f"evaluation.dataUri {data_uri} holds no task *.yaml file")
    return path.resolve()
