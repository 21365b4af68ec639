"""The trainer's run config: a FinetuneJob spec with every default resolved, plus where it runs.

The operator writes it into a ConfigMap mounted in the training pod; `finetune run --config` reads
it. A user can also hand the trainer a FinetuneJob YAML directly (`RunConfig.from_manifest`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from .base import ApiModel
from .egress import EgressPolicy
from .spec import FinetuneJobSpec


class RunRef(ApiModel):
    namespace: str = Field("default", description="FinetuneJob namespace.")
    name: str = Field(description="FinetuneJob name.")
    uid: str | None = Field(None, description="FinetuneJob uid.")
    generation: int | None = Field(None, description="Spec generation this run trains.")
    run: int = Field(1, ge=1, description="Run number.")


class RunConfig(ApiModel):
    api_version: Literal["finetune.dev/v1alpha1"] = "finetune.dev/v1alpha1"
    kind: Literal["RunConfig"] = "RunConfig"
    job: RunRef
    spec: FinetuneJobSpec
    output_uri: str = Field(description="s3://bucket/prefix/namespace/name/uid/run-N/ (trailing slash).")
    egress: EgressPolicy | None = Field(None, description=(
        "Where the trainer may connect and which local folders it may read; set by the operator from its "
        "own configuration. Unset (the trainer run on its own): not enforced."))

    @staticmethod
    def output_uri_for(spec: FinetuneJobSpec, job: RunRef) -> str:
        """Keyed by the object's uid as well as its run: a deleted and re-created FinetuneJob of the
        same name never sees the old one's checkpoints or artifacts."""
        s3 = spec.output.s3
        if not s3.bucket:
            raise ValueError("spec.output.s3.bucket: no bucket given and no default configured")
        parts = (s3.prefix.strip("/"), job.namespace, job.name, job.uid or "", f"run-{job.run}")
        return f"s3://{s3.bucket}/{'/'.join(p for p in parts if p)}/"

    @classmethod
    def build(cls, spec: FinetuneJobSpec, job: RunRef, egress: EgressPolicy | None = None) -> RunConfig:
        return cls(job=job, spec=spec, output_uri=cls.output_uri_for(spec, job), egress=egress)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], run: int = 1) -> RunConfig:
        """A FinetuneJob manifest (as a user would apply it) → run config, for standalone use."""
        meta = manifest.get("metadata") or {}
        spec = FinetuneJobSpec.model_validate(manifest.get("spec") or {})
        ref = RunRef(namespace=meta.get("namespace") or "default", name=meta.get("name") or "local", run=run)
        return cls.build(spec, ref)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """Reads either a RunConfig or a FinetuneJob YAML file."""
        doc = yaml.safe_load(Path(path).read_text())
        if isinstance(doc, dict) and doc.get("kind") == "FinetuneJob":
            return cls.from_manifest(doc)
        return cls.model_validate(doc)

    def to_yaml(self) -> str:
        # Full dump, defaults included: the trainer sees exactly what the operator resolved.
        return yaml.safe_dump(self.model_dump(by_alias=True, exclude_none=True, mode="json"), sort_keys=False)
