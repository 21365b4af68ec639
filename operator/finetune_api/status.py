"""FinetuneJob.status: phase, conditions (metav1.Condition shape), live progress, metrics, artifacts.

Ownership: the operator writes everything except `progress`, `metrics`, `artifacts` and `warm`, which
the trainer reports for its own run (guarded by `status.run`, so a stale trainer cannot overwrite a
newer run's fields).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import Field

from .base import ApiModel

RFC3339 = "%Y-%m-%dT%H:%M:%SZ"  # every time in a status, its history and a manifest: UTC, whole seconds


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime(RFC3339)


def parse_rfc3339(text: str) -> datetime:
    return datetime.strptime(text, RFC3339).replace(tzinfo=UTC)


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
    """Every reason a user can see: in status.reason, a condition, an Event or a trainer's termination
    message. Each carries its meaning (`.doc`), which docs/api.md lists. The trainer's reasons reach the
    status through its termination message; `(42)` ones are never retried, `(75)` ones are."""

    doc: str

    def __new__(cls, value: str, doc: str = "") -> Reason:
        member = str.__new__(cls, value)
        member._value_ = value
        member.doc = doc
        return member

    # --- the run's lifecycle (operator) ---
    JOB_CREATED = "JobCreated", "Event: a run's Job was created (or adopted after an operator restart)."
    SPEC_CHANGED = "SpecChanged", "Event: the spec changed, so run N+1 started and run N was retired to history."
    JOB_PENDING = "JobPending", "Pending: the run's Job is being created."
    POD_PENDING = "PodPending", "Pending: the Job exists; its pod is not scheduled or not started yet."
    QUEUED = "Queued", "Queued: Kueue has not admitted the Job yet (runPolicy.queueName)."
    SUSPENDED = "Suspended", "Suspended: runPolicy.suspend is true; the Job's pods are gone, its checkpoints stay."
    RESUMED = "Resumed", "Event: runPolicy.suspend went back to false."
    NOT_SUSPENDED = "NotSuspended", "Condition Suspended is False."
    NOT_FAILED = "NotFailed", "Condition Failed is False."
    NOT_FINISHED = "NotFinished", "Condition Finished is False."
    STAGE_STARTED = "StageStarted", "Preparing…Uploading: the trainer reported this stage."
    COMPLETED = "Completed", "Succeeded: the trainer reported its artifacts (manifest) in S3."
    HANDED_OFF = "HandedOff", ("Event, and Pending until the trainer reports: a spec edit's run was handed to the "
                               "previous run's warm trainer (runPolicy.keepWarmSeconds) instead of a new Job.")
    # --- this generation cannot start (operator) ---
    INVALID_SPEC = "InvalidSpec", "Failed until the spec changes: a field is invalid (the message names it)."
    POLICY_DENIED = "PolicyDenied", "Failed until the spec changes: it asks for what the cluster admin did not allow."
    JOB_REJECTED = "JobRejected", "Failed until the spec changes: the apiserver refused the Job built from the spec."
    CHILD_NOT_OWNED = "ChildNotOwned", ("Failed until the spec changes: an object with the name of one of the run's "
                                        "children exists and this FinetuneJob is not its controller (the message "
                                        "names it); the operator never adopts what it did not create.")
    CHILD_REJECTED = "ChildRejected", ("Failed until the spec changes: the apiserver refused one of the run's children "
                                       "(Role, ServiceAccount, ConfigMap, Service, Job: RBAC, quota, admission); "
                                       "what the run had created is removed.")
    SECRET_NOT_FOUND = "SecretNotFound", "Pending: a referenced Secret (or its key) is missing; retried every 30 s."
    CONFIGMAP_NOT_FOUND = "ConfigMapNotFound", "Pending: dataset.configMapRef (or its key) is missing; retried."
    SERVICE_ACCOUNT_NOT_FOUND = "ServiceAccountNotFound", "Pending: resources.serviceAccountName is missing; retried."
    # --- the run failed (operator) ---
    POD_NOT_STARTING = "PodNotStarting", ("Pending while the pod cannot start (image pull, container config); "
                                          "Failed when it never can (an invalid image name).")
    POD_NOT_CREATED = "PodNotCreated", ("Pending while the Job cannot create its pod (a ResourceQuota, a missing "
                                        "ServiceAccount: the message quotes the Job's FailedCreate); Failed when "
                                        "admission refuses the pod for good (PodSecurity, a webhook).")
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded", "Failed: the trainer failed runPolicy.backoffLimit+1 times."
    DEADLINE_EXCEEDED = "DeadlineExceeded", "Failed: the run outlived runPolicy.activeDeadlineSeconds."
    CONFIG_ERROR = "ConfigError", "Failed: the trainer exited 42 without a reason of its own."
    JOB_DELETED = "JobDeleted", "Failed: the run's Job was deleted before it finished."
    NO_COMPLETION_REPORT = "NoCompletionReport", "Failed: the Job completed but the trainer never reported artifacts."
    # --- the trainer: a retry would fail the same way (exit 42) ---
    CONFIG_NOT_FOUND = "ConfigNotFound", "(42) the run config file does not exist."
    UNKNOWN_QUANTIZATION = "UnknownQuantization", "(42) a GGUF quantization type llama.cpp does not know."
    INVALID_DATASET = "InvalidDataset", "(42) rows are malformed, empty, or too few for the splits asked for."
    DATASET_NOT_FOUND = "DatasetNotFound", "(42) the dataset source does not exist."
    MODEL_NOT_FOUND = "ModelNotFound", "(42) the base model does not exist (or is gated without a token)."
    MODEL_NOT_READABLE = "ModelNotReadable", ("(42) a local base model's files exist but the trainer's user (uid 1000 "
                                              "in the image) may not read them.")
    INVALID_MODEL = "InvalidModel", "(42) the base model cannot be loaded or converted as asked."
    UNSUPPORTED_METHOD = "UnsupportedMethod", "(42) training.method needs what this pod lacks (qlora: a CUDA GPU)."
    UNSUPPORTED_OPTIMIZER = "UnsupportedOptimizer", "(42) training.optimizer is not available here."
    PADDING_FREE_UNSUPPORTED = "PaddingFreeUnsupported", "(42) training.paddingFree is on but the model cannot use it."
    CHECKPOINT_MISMATCH = "CheckpointMismatch", "(42) the run's newest checkpoint does not fit the model."
    TRAINING_DIVERGED = "TrainingDiverged", "(42) the loss became NaN or infinite."
    OUT_OF_MEMORY = "OutOfMemory", "(42) out of (GPU) memory: lower batchSize or maxSeqLength."
    COMPILE_FAILED = "CompileFailed", "(42) torch.compile failed on this model."
    CONVERTER_NOT_FOUND = "ConverterNotFound", "(42) llama.cpp's converter is missing from the image."
    CONVERSION_FAILED = "ConversionFailed", "(42) converting the merged model to GGUF failed."
    QUANTIZATION_FAILED = "QuantizationFailed", "(42) llama.cpp could not quantize the GGUF."
    UNKNOWN_TASK = "UnknownTask", "(42) an evaluation task lm-eval does not know (nor evaluation.dataUri has)."
    EVALUATION_FAILED = "EvaluationFailed", "(42) lm-eval could not evaluate a GGUF file on the tasks."
    MISSING_STAGE_OUTPUT = "MissingStageOutput", "(42) a stage command ran before the stage it reads from."
    INVALID_URI = "InvalidURI", "(42) an s3:// URI without a bucket or key."
    MISSING_CREDENTIALS = "MissingCredentials", "(42) no S3 credentials in the pod."
    INVALID_CREDENTIALS = "InvalidCredentials", "(42) S3 refused the credentials."
    ACCESS_DENIED = "AccessDenied", "(42) the credentials may not read or write the bucket."
    BUCKET_NOT_FOUND = "BucketNotFound", "(42) the output bucket does not exist."
    OBJECT_NOT_FOUND = "ObjectNotFound", "(42) an s3:// object named in the spec does not exist."
    STORAGE_ERROR = "StorageError", "(42) S3 answered with an error a retry would get again."
    CONFIG_TAMPERED = "ConfigTampered", ("(42) the run config is not the one the operator wrote (its ConfigMap was "
                                         "edited): its SHA-256 differs from the one in the Job's pod template.")
    PATH_NOT_ALLOWED = "PathNotAllowed", "(42) a local path the operator's egress rule does not allow."
    EGRESS_DENIED = "EgressDenied", "(42) a connection the operator's egress rule does not allow."
    # --- the trainer: retried, resuming from the newest checkpoint (exit 75, or any other code) ---
    STORAGE_UNAVAILABLE = "StorageUnavailable", "(75) S3 did not answer or answered 5xx."
    DATASET_UNAVAILABLE = "DatasetUnavailable", "(75) the dataset server did not answer."
    MODEL_UNAVAILABLE = "ModelUnavailable", "(75) the model hub did not answer."
    STATUS_REPORT_FAILED = "StatusReportFailed", "(75) the completion report could not be written to the status."
    TERMINATED = "Terminated", "(75) the pod got SIGTERM (preemption, node drain); the retry resumes."
    INTERRUPTED = "Interrupted", "(75) interrupted."
    INTERNAL_ERROR = "InternalError", "(1, retried) an unexpected failure: a bug to report, with the pod's log."
    # --- FinetuneSweep ---
    STARTING = "Starting", "Sweep Pending: creating the first trials."
    TRIALS_RUNNING = "TrialsRunning", "Sweep Running: trials are running."
    TRIAL_CREATED = "TrialCreated", "Sweep Event: a trial FinetuneJob was created."
    TRIAL_PRUNED = "TrialPruned", "Sweep Event: early stopping pruned a trial."
    NO_TRIAL_SUCCEEDED = "NoTrialSucceeded", "Sweep Failed: every trial ended without a value of the objective."


# A new generation that hits one of these does not start; it waits for a spec change, never a retry.
SPEC_REASONS = frozenset({Reason.INVALID_SPEC, Reason.POLICY_DENIED, Reason.JOB_REJECTED, Reason.CHILD_NOT_OWNED,
                          Reason.CHILD_REJECTED})
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
    eval_loss: float | None = Field(None, description=(
        "Loss on the validation split at evalStep (training.evalEverySteps, and once after training)."))
    eval_step: int | None = Field(None, description="Optimizer step evalLoss was computed at.")
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


class WarmStatus(ApiModel):
    """A trainer whose run succeeded and that waits, warm, for the next one (runPolicy.keepWarmSeconds)."""

    run: int = Field(description="Run the warm trainer finished; it takes only a later one.")
    pod: str = Field(description="The warm trainer's pod.", max_length=253)
    until: str = Field(description="When the trainer leaves if not handed a run (RFC 3339).")


class HandoffStatus(ApiModel):
    """A run the operator handed to the warm trainer; the trainer removes it as it takes it."""

    run: int = Field(description="Run number handed off.")
    config_sha256: str = Field(description="Hex SHA-256 of config, as in the run's ConfigMap and Job env.",
                               pattern="^[0-9a-f]{64}$")
    config: str = Field(description="The run's run.yaml, exactly as written into its ConfigMap.",
                        max_length=1_048_576)


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
    warm: WarmStatus | None = Field(None, description=(
        "Set by the trainer: its run succeeded and it stays up for the next run until `until` "
        "(runPolicy.keepWarmSeconds); removed when it leaves or is handed a run."))
    handoff: HandoffStatus | None = Field(None, description=(
        "Set by the operator: the current run, handed to the warm trainer instead of a new Job; "
        "removed by the trainer as it takes it."))
    history: list[HistoryEntry] | None = Field(None, description="Earlier runs, oldest first.")
    reason: str | None = Field(None, description="Reason for the current phase (CamelCase).")
    message: str | None = Field(None, description="Detail for the current phase.")
