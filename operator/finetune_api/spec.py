"""FinetuneJob.spec: what to fine-tune, on what data, how, and where the artifacts go.

Defaults live here, not in the CRD: the apiserver stores exactly what the user applied (so Argo CD
never sees a diff it did not cause) and the operator resolves defaults into the run config.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, StringConstraints
from pydantic.alias_generators import to_snake

from .base import ApiModel, Rule

DEFAULT_BASE_MODEL = "unsloth/gemma-3-270m-it"
DEFAULT_GGUF = "q4_k_m"

# llama.cpp's quantization types (llama-quantize / llama_model_quantize ftypes), lower-cased as
# users write them. f16/bf16/f32 come straight from the converter; every other type is quantized
# from the 16-bit file, never re-quantized from another quant.
GgufQuant = Literal[
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0",
    "q4_k_m", "q4_k_s", "q4_1", "q4_0", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k",
    "iq4_nl", "iq4_xs", "tq1_0", "tq2_0",
]
GGUF_QUANT_TYPES: tuple[str, ...] = get_args(GgufQuant)

K8S_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Kubernetes' own resource.Quantity grammar, unsigned: what the apiserver accepts in a Job.
QUANTITY = (r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|"
            r"(\.[0-9]+))))?$")
LABEL_KEY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
# An image reference: [registry[:port]/]path[:tag][@sha256:digest], lower-case path, no spaces.
IMAGE_REF = (r"^[a-z0-9]+([._-][a-z0-9]+)*(\.[a-z0-9-]+)*(:[0-9]{1,5})?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*"
             r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$")
HF_REPO_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$"
BUCKET = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
# Where data and models can come from. URLs never carry credentials (no userinfo: they would be copied
# into the run ConfigMap, readable with `view`); credentials come only from Secret references.
HTTP_URL = r"^https?://[^/@\s?#]+(/\S*)?$"
DATASET_SOURCE = (r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/\S+|https?://[^/@\s?#]+(/\S*)?|/\S+|"
                  r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*)$")
# System folders are never a dataset, a model or task data, whatever the operator allows.
SYSTEM_PATHS = r"^/(etc|proc|sys|dev|run|var/run|var/lib/kubelet|boot|bin|sbin|lib|lib32|lib64|usr|host)(/|$)"
DOT_SEGMENT = r"(^|/)[.]{1,2}(/|$)"
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"  # a Secret's or ConfigMap's data key
SET = {"x-kubernetes-list-type": "set"}  # the apiserver rejects duplicates (uniqueItems is not allowed)
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _has(obj: Any, *names: str) -> list[bool]:
    return [getattr(obj, n) is not None for n in names]


def safe_local_path(value: str | None) -> bool:
    """Not a local path, or an absolute one with no `.`/`..`/empty segment that is not a system folder."""
    if not value or not value.startswith("/"):
        return True
    return not (re.search(SYSTEM_PATHS, value) or re.search(DOT_SEGMENT, value) or "//" in value)


def local_path_rule(field: str, path: str) -> Rule:
    """Admission and Python check of a field that may hold a local path (`path`: its spec path)."""
    cel = (f"!has(self.{field}) || !self.{field}.startsWith('/') || "
           f"(!self.{field}.matches('{SYSTEM_PATHS}') && !self.{field}.matches('{DOT_SEGMENT}') && "
           f"!self.{field}.contains('//'))")
    return Rule(cel, f"{path}: a local path must be absolute, without '.', '..' or empty segments, and not a "
                     "system folder (/etc, /proc, /sys, /dev, /run, /var/run, /usr, …)",
                lambda s: safe_local_path(getattr(s, to_snake(field))), field_path=f".{field}")


class SecretKeyRef(ApiModel):
    """A key of a Secret in the FinetuneJob's own namespace."""

    name: str = Field(description="Name of the Secret, in the FinetuneJob's namespace.", pattern=K8S_NAME,
                      max_length=253)
    key: str = Field("HF_TOKEN", description="Key inside the Secret.", pattern=SECRET_KEY, max_length=253)


class ConfigMapKeyRef(ApiModel):
    name: str = Field(description="Name of the ConfigMap, in the FinetuneJob's namespace.", pattern=K8S_NAME,
                      max_length=253)
    key: str = Field(description="Key whose value holds the rows (JSON Lines or a JSON array).",
                     pattern=SECRET_KEY, max_length=253)


class BaseModelSpec(ApiModel):
    """The model to fine-tune. Set `name` or `uri`, not both; neither means unsloth/gemma-3-270m-it."""

    rules = (
        Rule("!(has(self.name) && has(self.uri))", "baseModel: set only one of name and uri",
             lambda s: not all(_has(s, "name", "uri"))),
        local_path_rule("uri", "spec.baseModel.uri"),
    )
    name: str | None = Field(None, description="Hugging Face repo id, e.g. unsloth/gemma-3-270m-it.",
                             pattern=HF_REPO_ID, max_length=200)
    uri: str | None = Field(None, description=(
        "Where the weights are instead of the Hub: s3://bucket/path (a Hugging Face folder), a local path "
        "in the trainer image or a mounted volume (under a root the operator allows: Helm value "
        "security.localPathRoots), or a .gguf file to start from (dequantized to 16-bit before training)."),
        pattern=r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/\S+|/\S+)$", max_length=1024)
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).",
                                 pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$", max_length=200)
    token_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding a Hugging Face token for gated or private models.")

    def resolved_name(self) -> str:
        return self.uri or self.name or DEFAULT_BASE_MODEL


DatasetFormat = Literal["auto", "alpaca", "sharegpt", "messages", "text", "prompt-completion"]


class DatasetSpec(ApiModel):
    """Training data. Set exactly one of `source` and `configMapRef`."""

    rules = (
        Rule("has(self.source) != has(self.configMapRef)",
             "dataset: set exactly one of source and configMapRef",
             lambda s: (s.source is None) != (s.config_map_ref is None)),
        local_path_rule("source", "spec.dataset.source"),
    )
    source: str | None = Field(None, description=(
        "A Hugging Face dataset id (yahma/alpaca-cleaned), s3://bucket/key, https://… (JSON Lines, JSON, "
        "CSV or Parquet; http:// and in-cluster hosts only where the operator allows them), or a local "
        "path under a root the operator allows. Never credentials in the URL."),
        pattern=DATASET_SOURCE, min_length=1, max_length=1024)
    config_map_ref: ConfigMapKeyRef | None = Field(
        None, description="Inline rows from a ConfigMap key (JSON Lines or a JSON array); for small sets.")
    split: str = Field("train", description="Split to train on.", pattern=r"^[A-Za-z0-9_.\[\]:%-]+$",
                       max_length=100)
    format: DatasetFormat = Field("auto", description=(
        "Row format. auto detects alpaca (instruction/input/output), sharegpt (conversations), messages "
        "(OpenAI chat), prompt-completion and text; ambiguous data is an error naming the columns."))
    validation_split: float = Field(0.0, ge=0.0, le=0.5, description=(
        "Fraction of rows held out for validation loss and the GGUF parity check. 0 keeps a few rows "
        "for parity only."))
    max_samples: int | None = Field(None, ge=1, le=100_000_000,
                                    description="Use at most this many rows (after shuffling with the seed).")


LabelValue = Annotated[str, StringConstraints(pattern=LABEL_VALUE, max_length=63)]
TargetModule = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$", max_length=128)]
EvalTask = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128)]


class LoraSpec(ApiModel):
    r: int = Field(16, ge=1, le=256, description="LoRA rank.")
    alpha: int = Field(16, ge=1, le=1024, description="LoRA alpha; Unsloth's recipes use alpha = r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout; 0 lets Unsloth use its fast path.")
    target_modules: list[TargetModule] = Field(
        default_factory=lambda: list(ALL_PROJECTIONS), min_length=1, max_length=32, json_schema_extra=SET,
        description=("Modules to adapt (names of the model's linear layers; the trainer checks they exist "
                     "before it prepares data). Default: all 7 attention and MLP projections."))


class TrainingSpec(ApiModel):
    """How to train. Set at most one of `epochs` and `maxSteps`; neither means 1 epoch."""

    rules = (
        Rule("!(has(self.epochs) && has(self.maxSteps))", "training: set only one of epochs and maxSteps",
             lambda s: not all(_has(s, "epochs", "max_steps"))),
    )
    method: Literal["lora", "qlora"] = Field(
        "lora", description="lora: 16-bit base + LoRA. qlora: 4-bit base + LoRA (needs a GPU).")
    epochs: float | None = Field(None, gt=0, le=100, description="Passes over the data.")
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="Optimizer steps; overrides epochs.")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    batch_size: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        "auto", json_schema_extra={"x-kubernetes-int-or-string": True, "x-kubernetes-validations": [
            {"rule": "type(self) == int ? (self >= 1 && self <= 1024) : self == 'auto'",
             "message": "batchSize: a number from 1 to 1024, or auto"}]}, description=(
            "Micro-batch size per GPU, or auto: on a GPU, the power of two nearest below 65536 / "
            "maxSeqLength (about 65k tokens a step keeps a GPU busy), halved while the estimated memory "
            "does not fit the GPU's free memory; 8 on CPU. A number always wins over auto."))
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024,
                                             description="Micro-batches per optimizer step.")
    max_seq_length: int = Field(1024, ge=16, le=131072, description="Tokens per sequence; longer rows are truncated (and counted).")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Fraction of steps spent warming up the learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warmup.")
    weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW weight decay.")
    seed: int = Field(3407, ge=0, le=2**31 - 1, description="Seed for shuffling, LoRA init and dropout.")
    packing: bool = Field(False, description="Pack several rows into each sequence of up to maxSeqLength tokens (each "
                          "row still attends only to itself), so every micro-batch carries batchSize x "
                          "maxSeqLength tokens and an epoch takes fewer, fuller steps. Worth it on padding-free "
                          "batches (paddingFree, the GPU default) with short rows; on padded rows with Unsloth "
                          "it is slower than padding (measurements: docs/benchmarks.md).")
    padding_free: Literal["auto", "on", "off"] = Field(
        "auto", description=(
            "On GPU, lay each micro-batch out as one row of its sequences back to back, attended by "
            "FlashAttention's varlen kernel (Gemma 3 through the trainer's route, Llama through "
            "Unsloth's): no padding, no attention across sequences, the same scores as padded rows, and "
            "faster on rows of mixed lengths (docs/benchmarks.md). auto: on wherever the model can take it, 16-bit LoRA and "
            "4-bit QLoRA alike; models it cannot serve (Gemma 2's logit softcapping) stay padded. on: the "
            "same, but such a model fails the run instead. off: padded rows. No effect on CPU."))
    train_on_responses_only: bool = Field(
        True, description="Compute the loss on the assistant's tokens only, not on the prompt.")
    chat_template: Literal["auto", "gemma3", "chatml", "llama3"] = Field(
        "auto", description="Chat template; auto uses the tokenizer's own, else gemma3.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA adapter shape.")
    optimizer: Literal["adamw_torch_fused", "adamw_torch", "adamw_8bit"] = Field(
        "adamw_torch_fused", description=(
            "Optimizer. Fused torch AdamW is fastest for LoRA's few million parameters; 8-bit AdamW "
            "saves no memory worth having there and is several times slower (docs/benchmarks.md)."))
    gradient_checkpointing: bool | None = Field(
        None, description=(
            "Recompute activations in the backward pass (Unsloth's offloaded variant on GPU). Unset means "
            "auto: on a GPU, off where the micro-batch's activations fit its free memory (faster) and on "
            "where they do not; on for CPU. true or false always wins."))
    checkpoint_every_steps: int | None = Field(
        None, ge=1, le=10_000_000,
        description="Save a resumable checkpoint (locally and to S3) every N steps. Unset: only at the end.")
    eval_every_steps: int | None = Field(
        None, ge=1, le=10_000_000, description=(
            "Compute the loss on the validation split every N optimizer steps (process 0, while the "
            "others wait) and report it as status.progress.evalLoss at progress.evalStep; a sweep's "
            "early stopping compares these. Needs dataset.validationSplit > 0. Unset: only once, after "
            "training (metrics.evalLoss)."))


class ExportSpec(ApiModel):
    """What a run produces. At least one of gguf, adapter and mergedSafetensors."""

    rules = (
        Rule("(has(self.gguf) && size(self.gguf) > 0) || !has(self.adapter) || self.adapter || "
             "(has(self.mergedSafetensors) && self.mergedSafetensors)",
             "export: nothing to export (set gguf, adapter or mergedSafetensors)",
             lambda s: bool(s.gguf or s.adapter or s.merged_safetensors)),
    )
    gguf: list[GgufQuant] = Field(
        default_factory=lambda: [DEFAULT_GGUF], max_length=len(GGUF_QUANT_TYPES), json_schema_extra=SET,
        description="GGUF quantization types to export, each made from the 16-bit GGUF with llama.cpp.")
    adapter: bool = Field(True, description="Upload the LoRA adapter (safetensors) too.")
    merged_safetensors: bool = Field(False, description="Upload the merged 16-bit Hugging Face model too.")
    ollama_modelfile: bool = Field(True, description="Write an Ollama Modelfile next to the GGUF files.")
    parity_check: bool = Field(True, description=(
        "Compare each GGUF's next-token predictions and perplexity with the merged model on held-out rows."))
    parity_samples: int = Field(16, ge=1, le=1024, description="Held-out rows used by the parity check.")


class EvaluationSpec(ApiModel):
    """Evaluate the exported GGUF files with lm-evaluation-harness, in process through llama.cpp."""

    rules = (local_path_rule("dataUri", "spec.evaluation.dataUri"),)

    tasks: list[EvalTask] = Field(min_length=1, max_length=64, json_schema_extra=SET, description=(
        "lm-evaluation-harness task names, e.g. hellaswag, mmlu, arc_easy, arc_challenge, piqa, "
        "winogrande, boolq."))
    limit: int | None = Field(None, ge=1, le=1_000_000, description="At most this many examples per task.")
    num_fewshot: int | None = Field(None, ge=0, le=25, description="Few-shot examples; unset uses each task's default.")
    data_uri: str | None = Field(None, description=(
        "Offline task data (s3://… or a local path under a root the operator allows) for air-gapped "
        "clusters: a folder of lm-eval task YAML files with their JSON Lines data."),
        pattern=r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/\S*)?|/\S+)$", max_length=1024)
    quantizations: list[GgufQuant] | None = Field(
        None, max_length=len(GGUF_QUANT_TYPES), json_schema_extra=SET,
        description="Which exported GGUF files to evaluate (each must be in export.gguf); default all of them.")
    include_base: bool = Field(False, description="Also evaluate the base model for a before/after delta.")


class S3CredentialsRef(ApiModel):
    """A Secret in the FinetuneJob's namespace holding S3 credentials. Never inline keys in a spec."""

    name: str = Field(description="Name of the Secret.", pattern=K8S_NAME, max_length=253)
    access_key_id_key: str = Field("AWS_ACCESS_KEY_ID", description="Key holding the access key id.",
                                   pattern=SECRET_KEY, max_length=253)
    secret_access_key_key: str = Field("AWS_SECRET_ACCESS_KEY", description="Key holding the secret key.",
                                       pattern=SECRET_KEY, max_length=253)


class S3Spec(ApiModel):
    rules = (
        Rule(f"!has(self.prefix) || (!self.prefix.startsWith('/') && !self.prefix.contains('//') && "
             f"!self.prefix.matches('{DOT_SEGMENT}'))",
             "spec.output.s3.prefix: no leading '/', no empty, '.' or '..' segments",
             lambda s: not (s.prefix.startswith("/") or "//" in s.prefix or re.search(DOT_SEGMENT, s.prefix)),
             field_path=".prefix"),
    )
    bucket: str | None = Field(None, description=(
        "Bucket for every artifact. Unset uses the operator's default bucket (Helm value s3.bucket)."),
        pattern=BUCKET)
    prefix: str = Field("finetune", description=(
        "Key prefix. Artifacts go to <prefix>/<namespace>/<name>/<uid>/run-<n>/ (the uid keeps a "
        "re-created FinetuneJob of the same name apart from the deleted one)."),
        pattern=r"^[A-Za-z0-9!_.*'()/-]*$", max_length=512)
    endpoint: str | None = Field(None, description=(
        "S3 endpoint URL for non-AWS stores (SeaweedFS, MinIO, Ceph). https only, and no private or "
        "in-cluster address, unless the operator allows it (Helm values security.egress.*). No credentials "
        "in the URL."), pattern=HTTP_URL, max_length=512)
    region: str = Field("us-east-1", description="Region.", pattern=r"^[a-z0-9-]+$", max_length=64)
    force_path_style: bool = Field(False, description="Path-style addressing (most non-AWS stores need it).")
    credentials_secret_ref: S3CredentialsRef | None = Field(None, description=(
        "Secret with the credentials. Unset uses the operator's default Secret (Helm value "
        "s3.credentialsSecretName), else the pod's ambient identity (IRSA, instance role)."))


class OutputSpec(ApiModel):
    s3: S3Spec = Field(default_factory=S3Spec, description="Where artifacts, checkpoints and the manifest are uploaded.")


class Toleration(ApiModel):
    """A core/v1 Toleration. The operator accepts only those its allow-list (Helm value
    security.allowedTolerations) matches; one that tolerates every taint (no key) is never accepted."""

    key: str = Field(description="Taint key to tolerate (required: an empty key would tolerate every taint).",
                     pattern=LABEL_KEY, max_length=316)
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value (with Equal).", pattern=LABEL_VALUE, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; unset tolerates every effect of the key.")
    toleration_seconds: int | None = Field(None, ge=0, le=86_400 * 30,
                                           description="With NoExecute: how long the pod stays after the taint.")


class ResourcesSpec(ApiModel):
    """Compute and placement of the training pod. Images, GPU resource names, priority classes,
    tolerations and ServiceAccounts are cluster-admin decisions: the operator accepts only what its
    Helm values (security.*) allow, and fails the FinetuneJob naming the field otherwise."""

    rules = (
        Rule("!has(self.priorityClassName) || !self.priorityClassName.startsWith('system-')",
             "spec.resources.priorityClassName: system- priority classes are reserved for the cluster",
             lambda s: not (s.priority_class_name or "").startswith("system-"), field_path=".priorityClassName"),
    )
    gpus: int = Field(1, ge=0, le=16, description=(
        "GPUs for each training pod; 0 trains on CPU (tiny models only). More than one runs the trainer "
        "under torchrun, one data-parallel process per GPU (DDP)."))
    nodes: int = Field(1, ge=1, le=64, description=(
        "Training pods (an Indexed Job with a headless Service; torchrun's c10d rendezvous on pod 0). "
        "The run has gpus x nodes processes (nodes on CPU). Whatever their number, a step is the same "
        "gradientAccumulationSteps micro-batches of batchSize rows in the same order, each process taking "
        "an equal share of them, so the global batch, the data order, the step count and the learning-"
        "rate schedule do not depend on gpus or nodes (hence gradientAccumulationSteps must be a multiple "
        "of the process count). Process 0 alone reports progress, checkpoints, exports and uploads; "
        "every process resumes from the same checkpoint, and a failed process fails the attempt."))
    gpu_resource_name: str = Field("nvidia.com/gpu", description=(
        "Extended resource name of a GPU; only names the operator allows (Helm value "
        "security.allowedGpuResources)."),
        pattern=r"^([a-z0-9.-]+/)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)
    cpu: str | None = Field(None, description="CPU request and limit, e.g. '8'.", pattern=QUANTITY, max_length=32)
    memory: str | None = Field(None, description="Memory request and limit, e.g. 32Gi.", pattern=QUANTITY,
                               max_length=32)
    # Keys are label keys: the apiserver judges them when the operator dry-runs the Job (a CEL rule
    # over a map's keys costs more than a CRD's validation budget allows).
    node_selector: dict[str, LabelValue] | None = Field(None, max_length=32,
                                                        description="Node labels the training pod requires.")
    tolerations: list[Toleration] | None = Field(None, max_length=16, description=(
        "Tolerations of the training pod; only those the operator allows (Helm value "
        "security.allowedTolerations)."))
    affinity: dict[str, Any] | None = Field(None, description="Affinity (core/v1 Affinity).")
    priority_class_name: str | None = Field(None, description=(
        "PriorityClass of the training pod; only those the operator allows (Helm value "
        "security.allowedPriorityClasses)."), pattern=K8S_NAME, max_length=253)
    image: str | None = Field(None, description=(
        "Trainer image; default is the operator's configured image. Only images under a prefix the "
        "operator allows (Helm value security.allowedImages)."), pattern=IMAGE_REF, max_length=512)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Image pull policy.")
    service_account_name: str | None = Field(None, description=(
        "ServiceAccount for the training pod; default one created per job. Refused unless the operator "
        "allows it (Helm value security.allowServiceAccountOverride); the operator never binds its Role to "
        "an account it did not create, so that account needs get/patch on this FinetuneJob's status."),
        pattern=K8S_NAME, max_length=253)


    @property
    def processes_per_node(self) -> int:
        """torchrun's --nproc-per-node: one process per GPU, one on CPU."""
        return max(self.gpus, 1)

    @property
    def world_size(self) -> int:
        return self.processes_per_node * self.nodes


class RunPolicySpec(ApiModel):
    backoff_limit: int = Field(2, ge=0, le=20, description="Retries of the training pod on transient failures.")
    active_deadline_seconds: int | None = Field(None, ge=1, le=86_400 * 60,
                                                description="Fail the run after this many seconds.")
    ttl_seconds_after_finished: int | None = Field(None, ge=0, le=86_400 * 365,
                                                   description="Delete the finished Job after this long.")
    suspend: bool = Field(False, description="Suspend the run (the Job's pods are removed) until set back to false.")
    queue_name: str | None = Field(None, description="Kueue LocalQueue; the Job is created suspended for Kueue to admit.",
                                   pattern=K8S_NAME, max_length=63)
    keep_warm_seconds: int = Field(0, ge=0, le=3600, description=(
        "After each successful run, keep the trainer's process (imports done, base model loaded, kernels "
        "compiled) alive this long, holding its GPU idle, and hand it the next run when a spec edit changes "
        "nothing of its Job but the run config: a re-run then skips the new pod's start, imports, model load "
        "and compile (on an H100: 10.5 s outside training steps instead of 25.1 s). 0: off. Single-process runs only; capped by the operator "
        "(Helm value security.maxKeepWarmSeconds)."))


# Fields as CEL sees them in a stored object, which carries no defaults.
ACCUM_CEL = ("has(self.training) && has(self.training.gradientAccumulationSteps) ? "
             "self.training.gradientAccumulationSteps : 1")
GPUS_CEL = "(has(self.resources) && has(self.resources.gpus) ? self.resources.gpus : 1)"
NODES_CEL = "has(self.resources) && has(self.resources.nodes) ? self.resources.nodes : 1"


class FinetuneJobSpec(ApiModel):
    """Fine-tune a small LLM with LoRA/QLoRA and export it as GGUF to S3."""

    rules = (
        Rule("!has(self.training) || !has(self.training.method) || self.training.method != 'qlora' || "
             "!has(self.resources) || !has(self.resources.gpus) || self.resources.gpus >= 1",
             "training.method qlora needs resources.gpus >= 1",
             lambda s: s.training.method != "qlora" or s.resources.gpus >= 1),
        Rule(f"({ACCUM_CEL}) % (({GPUS_CEL} > 0 ? {GPUS_CEL} : 1) * ({NODES_CEL})) == 0",
             "spec.training.gradientAccumulationSteps: must be a multiple of the training processes "
             "(resources.gpus x resources.nodes, one per node on CPU), which share each step's micro-batches",
             lambda s: s.training.gradient_accumulation_steps % s.resources.world_size == 0),
        Rule("!has(self.evaluation) || !has(self.export) || !has(self.export.gguf) || size(self.export.gguf) > 0",
             "evaluation needs at least one export.gguf type",
             lambda s: s.evaluation is None or len(s.export.gguf) > 0),
        Rule("!has(self.evaluation) || !has(self.evaluation.quantizations) || "
             "self.evaluation.quantizations.all(q, has(self.export) && has(self.export.gguf) ? "
             "q in self.export.gguf : q == '" + DEFAULT_GGUF + "')",
             "spec.evaluation.quantizations: each must be one of spec.export.gguf",
             lambda s: s.evaluation is None or not s.evaluation.quantizations
             or set(s.evaluation.quantizations) <= set(s.export.gguf)),
        Rule("!has(self.training) || !has(self.training.evalEverySteps) || "
             "(has(self.dataset.validationSplit) && self.dataset.validationSplit > 0.0)",
             "spec.training.evalEverySteps needs dataset.validationSplit > 0: the rows it evaluates on",
             lambda s: s.training.eval_every_steps is None or s.dataset.validation_split > 0,
             field_path=".training.evalEverySteps"),
        # A warm trainer is one process that takes the next run in place; torchrun's group would not.
        Rule("!has(self.runPolicy) || !has(self.runPolicy.keepWarmSeconds) || self.runPolicy.keepWarmSeconds == 0 || "
             f"({GPUS_CEL} <= 1 && ({NODES_CEL}) == 1)",
             "spec.runPolicy.keepWarmSeconds: a warm trainer needs a single training process "
             "(resources.gpus <= 1 and resources.nodes 1)",
             lambda s: s.run_policy.keep_warm_seconds == 0 or s.resources.world_size == 1,
             field_path=".runPolicy.keepWarmSeconds"),
    )
    base_model: BaseModelSpec = Field(default_factory=BaseModelSpec, description="The model to fine-tune.")
    dataset: DatasetSpec = Field(description="Training data.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Training hyperparameters.")
    export: ExportSpec = Field(default_factory=ExportSpec, description="What to export.")
    evaluation: EvaluationSpec | None = Field(None, description="Evaluate the GGUF files; unset skips evaluation.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where artifacts go.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Compute for the training pod.")
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec, description="Retries, deadlines, suspension, queueing, keeping the trainer warm.")
