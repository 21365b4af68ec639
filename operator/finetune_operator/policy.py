"""What a FinetuneJob may ask of the cluster: pure checks of a resolved spec against the admin's policy.

The schema and CEL rules reject what is wrong on any cluster; these checks reject what this cluster's
admin has not allowed (Helm values security.*): where the trainer may connect and read, which images,
GPU resources, priority classes, tolerations and ServiceAccounts a spec may name, and how long
a trainer may stay warm. Each problem names
its field, and nothing is created for a spec that has one.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from finetune_api.egress import EgressPolicy, local_path_problem, url_problem
from finetune_api.spec import FinetuneJobSpec

from .config import OperatorConfig, image_repository


def egress_policy(cfg: OperatorConfig) -> EgressPolicy:
    """The admin's egress rule; the default S3 endpoint the admin configured is always reachable."""
    hosts = list(cfg.egress_allowed_hosts)
    if cfg.default_s3_endpoint:
        parts = urlsplit(cfg.default_s3_endpoint)
        if parts.hostname:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            hosts.append(f"[{parts.hostname}]:{port}" if ":" in parts.hostname else f"{parts.hostname}:{port}")
    return EgressPolicy(allow_http=cfg.egress_allow_http, allowed_hosts=hosts,
                        local_path_roots=list(cfg.local_path_roots))


def _source_problem(egress: EgressPolicy, value: str | None) -> str | None:
    if not value:
        return None
    if value.startswith(("http://", "https://")):
        return url_problem(egress, value)
    if value.startswith("/"):
        return local_path_problem(egress, value)
    return None  # a Hub id or an s3:// URI (S3 goes through the checked endpoint)


def image_allowed(cfg: OperatorConfig, image: str) -> bool:
    """Entries ending in '/' allow a registry or namespace; others allow one repository (any tag)."""
    repo = image_repository(image)
    for entry in (*cfg.allowed_images, image_repository(cfg.trainer_image)):
        if entry.endswith("/") and repo.startswith(entry) or repo == image_repository(entry):
            return True
    return False


def toleration_allowed(allowed: list[dict[str, Any]], toleration: dict[str, Any]) -> bool:
    """An allowed entry matches on its key and on every other field it sets."""
    return any(a.get("key") == toleration.get("key")
               and all(toleration.get(k) == a[k] for k in ("operator", "value", "effect") if a.get(k) is not None)
               for a in allowed if a.get("key"))


def violations(spec: FinetuneJobSpec, cfg: OperatorConfig) -> list[str]:
    """Every way `spec` (defaults resolved) asks for more than the admin allowed, each naming its field."""
    egress = egress_policy(cfg)
    out: list[str] = []
    for field, value in (("spec.dataset.source", spec.dataset.source),
                         ("spec.baseModel.uri", spec.base_model.uri),
                         ("spec.evaluation.dataUri", spec.evaluation.data_uri if spec.evaluation else None)):
        problem = _source_problem(egress, value)
        if problem:
            out.append(f"{field}: {problem}")
    endpoint = spec.output.s3.endpoint
    if endpoint and (problem := url_problem(egress, endpoint)):
        out.append(f"spec.output.s3.endpoint: {problem}")

    res = spec.resources
    if res.image and not image_allowed(cfg, res.image):
        out.append(f"spec.resources.image: {res.image!r} is not an image the operator allows "
                   "(Helm value security.allowedImages)")
    gpu_names = {cfg.default_gpu_resource, *cfg.allowed_gpu_resources}
    if res.gpus and res.gpu_resource_name not in gpu_names:
        out.append(f"spec.resources.gpuResourceName: {res.gpu_resource_name!r} is not allowed "
                   f"(allowed: {', '.join(sorted(gpu_names))})")
    if res.priority_class_name and res.priority_class_name not in cfg.allowed_priority_classes:
        out.append(f"spec.resources.priorityClassName: {res.priority_class_name!r} is not allowed "
                   "(Helm value security.allowedPriorityClasses)")
    allowed = [*cfg.default_tolerations, *cfg.allowed_tolerations]
    for i, tol in enumerate(res.tolerations or []):
        wire = tol.wire() if hasattr(tol, "wire") else dict(tol)
        if not toleration_allowed(allowed, wire):
            out.append(f"spec.resources.tolerations[{i}]: toleration for {wire.get('key')!r} is not allowed "
                       "(Helm value security.allowedTolerations)")
    if res.service_account_name and not cfg.allow_service_account_override:
        out.append("spec.resources.serviceAccountName: naming a ServiceAccount is not allowed on this cluster "
                   "(Helm value security.allowServiceAccountOverride); leave it unset for a per-job account")
    warm = spec.run_policy.keep_warm_seconds
    if warm > cfg.max_keep_warm_seconds:
        out.append(f"spec.runPolicy.keepWarmSeconds: {warm} is more than this cluster allows "
                   f"({cfg.max_keep_warm_seconds}; Helm value security.maxKeepWarmSeconds): a warm trainer "
                   "holds its GPU idle")
    return out
