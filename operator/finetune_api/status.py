"""FinetuneJob.status: phase, conditions (metav1.Condition shape), live progress, metrics, artifacts.

Ownership: the operator writes everything except `progress`, `metrics` and `artifacts`, which the
trainer reports for its own run (guarded by `status.run`, so a stale trainer cannot overwrite a
newer run's fields).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import Field

from .base import ApiModel


class Phase(StrEnum):
    PENDING = "Pending"
    QUEUED = "Queued"
    SUSPENDED = "Suspended"
    PREPARING = "Preparing"
    TRAINING = "Training"
    EXPORTING = "Exporting"
    EVALUATING = "Evaluating"
    UPLOADING = "Uploading"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


# The trainer's stages, in order; each maps to the phase of the same name.
STAGES = (Phase.PREPARING, Phase.TRAINING, Phase.EXPORTING, Phase.EVALUATING, Phase.UPLOADING)


class ConditionType(StrEnum):
    READY = "Ready"  # the run's Job exists and is admitted (or running)
    RUNNING = "Running"  # the trainer is working on this generation
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"  # the trainer reported this generation's artifacts (manifest) in S3
    FAILED = "Failed"
    FINISHED = "Finished"  # Succeeded or Failed: `kubectl wait --for=condition=Finished` never hangs


class Reason(StrEnum):
    """Every reason a user can see in status.reason, a condition or an Event (the trainer's own, such
    as InvalidDataset, come from its termination message)."""

    JOB_CREATED = "JobCreated"
    QUEUED = "Queued"
    SUSPENDED = "Suspended"
    RESUMED = "Resumed"
    STAGE_STARTED = "StageStarted"
    COMPLETED = "Completed"
    SPEC_CHANGED = "SpecChanged"
    INVALID_SPEC = "InvalidSpec"
    SECRET_NOT_FOUND = "SecretNotFound"
    CONFIGMAP_NOT_FOUND = "ConfigMapNotFound"
    SERVICE_ACCOUNT_NOT_FOUND = "ServiceAccountNotFound"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    CONFIG_ERROR = "ConfigError"  # the trainer exited with the configuration-error code
    TRAINER_FAILED = "TrainerFailed"
    JOB_DELETED = "JobDeleted"
    POLICY_DENIED = "PolicyDenied"  # the spec asks for what the cluster admin did not allow
    JOB_REJECTED = "JobRejected"  # the apiserver refused the training Job built from the spec
    NO_COMPLETION_REPORT = "NoCompletionReport"  # the Job completed, the trainer never reported artifacts
    POD_NOT_STARTING = "PodNotStarting"  # image pull or container config errors


# A new generation that hits one of these does not start; it waits for a spec change, never a retry.
SPEC_REASONS = frozenset({Reason.INVALID_SPEC, Reason.POLICY_DENIED, Reason.JOB_REJECTED})
# Waiting on an object only the cluster can provide; the operator retries.
WAITING_REASONS = frozenset({Reason.SECRET_NOT_FOUND, Reason.CONFIGMAP_NOT_FOUND, Reason.SERVICE_ACCOUNT_NOT_FOUND})


class Condition(ApiModel):
    """A metav1.Condition."""

    type: str = Field(description="Condition type, e.g. Succeeded.", max_length=316)
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason.", max_length=1024)
    message: str = Field("", description="Human-readable detail.", max_length=32768)
    observed_generation: int | None = Field(None, ge=0, description="Generation this condition was set for.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")


class Progress(ApiModel):
    """Live progress, reported by the trainer at most every few seconds."""

    run: int | None = Field(None, description="Run this report belongs to.")
    stage: str | None = Field(None, description="Preparing, Training, Exporting, Evaluating or Uploading.")
    step: int | None = Field(None, description="Optimizer steps done.")
    total_steps: int | None = Field(None, description="Optimizer steps planned.")
    epoch: float | None = Field(None, description="Fractional epoch.")
    percent: int | None = Field(None, description="Percent of training done.")
    loss: float | None = Field(None, description="Training loss, smoothed over the report interval.")
    learning_rate: float | None = Field(None, description="Current learning rate.")
    tokens_per_second: float | None = Field(None, description=(
        "Training throughput (non-padding tokens), of all training processes together."))
    eta_seconds: int | None = Field(None, description="Estimated seconds of training left.")
    restarts: int | None = Field(None, description="Times this run's trainer resumed from a checkpoint.")
    message: str | None = Field(None, description="What the trainer is doing now.", max_length=1024)
    updated_at: str | None = Field(None, description="When this report was written (RFC 3339).")


class Artifact(ApiModel):
    name: str = Field(description="File name.")
    kind: str = Field(description="gguf, adapter, merged, modelfile, manifest, eval, plot, dataset-report, checkpoint.")
    quantization: str | None = Field(None, description="GGUF quantization type.")
    uri: str = Field(description="s3:// URI.")
    size_bytes: int = Field(description="Size in bytes.")
    sha256: str = Field(description="Hex SHA-256 of the object.")


class HistoryEntry(ApiModel):
    run: int = Field(description="Run number.")
    generation: int | None = Field(None, description="Spec generation the run trained.")
    phase: str = Field(description="Final (or last seen) phase of that run.")
    job_name: str | None = Field(None, description="Its Job.")
    start_time: str | None = Field(None, description="When it started.")
    completion_time: str | None = Field(None, description="When it ended.")
    reason: str | None = Field(None, description="Why it ended.")
    message: str | None = Field(None, description="Detail.")
    output_uri: str | None = Field(None, description="Its artifacts' S3 prefix.")
    world_size: int | None = Field(None, description="Its training processes.")
    gpus: int | None = Field(None, description="Its GPUs, all pods together.")
    metrics: dict[str, Any] | None = Field(None, description="Its metrics.")


class FinetuneJobStatus(ApiModel):
    phase: Phase | None = Field(None, description="Pending, Queued, Suspended, Preparing, Training, Exporting, "
                                                 "Evaluating, Uploading, Succeeded or Failed.")
    conditions: list[Condition] = Field(default_factory=list, description="Latest observations (metav1.Condition).")
    observed_generation: int | None = Field(None, description="Spec generation the current run trains.")
    run: int | None = Field(None, description="Current run number; each spec change starts a new run.")
    spec_hash: str | None = Field(None, description="Identity of the spec the current run trains (runPolicy.suspend excluded).")
    job_name: str | None = Field(None, description="The current run's Job.")
    output_uri: str | None = Field(None, description="The current run's S3 prefix.")
    world_size: int | None = Field(None, description=(
        "Training processes of the current run (resources.gpus x resources.nodes, one per node on CPU)."))
    gpus: int | None = Field(None, description="GPUs of the current run, all its pods together.")
    start_time: str | None = Field(None, description="When the current run started.")
    completion_time: str | None = Field(None, description="When the current run finished.")
    progress: Progress | None = Field(None, description="Live progress of the current run.")
    metrics: dict[str, Any] | None = Field(None, description=(
        "Metrics of the current run: trainLoss, evalLoss, parity (per quantization), eval (task results), "
        "timings."))
    artifacts: list[Artifact] | None = Field(None, description="Uploaded artifacts of the current run.")
    history: list[HistoryEntry] | None = Field(None, description="Earlier runs, oldest first.")
    reason: str | None = Field(None, description="Reason for the current phase (CamelCase).")
    message: str | None = Field(None, description="Detail for the current phase.")
