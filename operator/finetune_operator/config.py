"""Operator settings, read once from the environment (the Helm chart sets these)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TRAINER_IMAGE = "ghcr.io/finetune-operator/trainer:0.1.0"


def _json_env(name: str, default: Any) -> Any:
    raw = os.environ.get(name, "").strip()
    return json.loads(raw) if raw else default


def _list_env(name: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in (os.environ.get(name) or "").split(",") if v.strip())


def _bool_env(name: str, default: bool = False) -> bool:
    value = (os.environ.get(name) or "").strip().lower()
    return value in ("1", "true", "yes") if value else default


def image_repository(image: str) -> str:
    """ghcr.io/x/trainer:0.1.0@sha256:… → ghcr.io/x/trainer (a registry port is not a tag)."""
    image = image.split("@", 1)[0]
    head, _, last = image.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


@dataclass(frozen=True)
class OperatorConfig:
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    watch_namespaces: tuple[str, ...] = ()  # empty: every namespace
    default_gpu_resource: str = "nvidia.com/gpu"
    default_node_selector: dict[str, str] = field(default_factory=dict)
    default_tolerations: list[dict[str, Any]] = field(default_factory=list)
    default_queue_name: str | None = None
    default_s3_endpoint: str | None = None
    default_s3_bucket: str | None = None
    default_s3_credentials_secret: str | None = None
    progress_interval_seconds: int = 5
    status_writes_per_second: float = 100.0  # the operator's own status patches, all jobs together
    progress_reports_per_second: float = 20.0  # all trainers' reports together (sets each one's interval)
    metrics_port: int = 8080
    # --- what a spec may ask for: cluster-admin decisions (Helm values security.*) ---
    egress_allow_http: bool = False
    egress_allowed_hosts: tuple[str, ...] = ()
    local_path_roots: tuple[str, ...] = ("/data/", "/models/", "/mnt/")
    allowed_images: tuple[str, ...] = ()  # prefixes; empty: only the trainer image's repository
    allowed_gpu_resources: tuple[str, ...] = ()  # empty: only default_gpu_resource
    allowed_priority_classes: tuple[str, ...] = ()
    allowed_tolerations: list[dict[str, Any]] = field(default_factory=list)  # besides default_tolerations
    allow_service_account_override: bool = False
    compile_cache: bool = True  # trainers keep their compile caches (code they run) in S3
    # The longest runPolicy.keepWarmSeconds a spec may ask: a warm trainer holds its GPU idle. 0: none.
    max_keep_warm_seconds: int = 900

    @classmethod
    def from_env(cls) -> OperatorConfig:
        env = os.environ.get
        return cls(
            trainer_image=env("FINETUNE_TRAINER_IMAGE") or DEFAULT_TRAINER_IMAGE,
            image_pull_policy=env("FINETUNE_TRAINER_IMAGE_PULL_POLICY") or "IfNotPresent",
            watch_namespaces=tuple(n.strip() for n in (env("FINETUNE_WATCH_NAMESPACES") or "").split(",") if n.strip()),
            default_gpu_resource=env("FINETUNE_DEFAULT_GPU_RESOURCE") or "nvidia.com/gpu",
            default_node_selector=_json_env("FINETUNE_DEFAULT_NODE_SELECTOR", {}),
            default_tolerations=_json_env("FINETUNE_DEFAULT_TOLERATIONS", []),
            default_queue_name=env("FINETUNE_DEFAULT_QUEUE_NAME") or None,
            default_s3_endpoint=env("FINETUNE_DEFAULT_S3_ENDPOINT") or None,
            default_s3_bucket=env("FINETUNE_DEFAULT_S3_BUCKET") or None,
            default_s3_credentials_secret=env("FINETUNE_DEFAULT_S3_CREDENTIALS_SECRET") or None,
            progress_interval_seconds=int(env("FINETUNE_PROGRESS_INTERVAL") or 5),
            status_writes_per_second=float(env("FINETUNE_STATUS_WRITES_PER_SECOND") or 100),
            progress_reports_per_second=float(env("FINETUNE_PROGRESS_REPORTS_PER_SECOND") or 20),
            metrics_port=int(env("FINETUNE_METRICS_PORT") or 8080),
            egress_allow_http=_bool_env("FINETUNE_EGRESS_ALLOW_HTTP"),
            egress_allowed_hosts=_list_env("FINETUNE_EGRESS_ALLOWED_HOSTS"),
            local_path_roots=_list_env("FINETUNE_LOCAL_PATH_ROOTS") or ("/data/", "/models/", "/mnt/"),
            allowed_images=_list_env("FINETUNE_ALLOWED_IMAGES"),
            allowed_gpu_resources=_list_env("FINETUNE_ALLOWED_GPU_RESOURCES"),
            allowed_priority_classes=_list_env("FINETUNE_ALLOWED_PRIORITY_CLASSES"),
            allowed_tolerations=_json_env("FINETUNE_ALLOWED_TOLERATIONS", []),
            allow_service_account_override=_bool_env("FINETUNE_ALLOW_SERVICE_ACCOUNT_OVERRIDE"),
            compile_cache=_bool_env("FINETUNE_COMPILE_CACHE_ALLOWED", default=True),
            max_keep_warm_seconds=int(env("FINETUNE_MAX_KEEP_WARM_SECONDS") or 900),
        )
