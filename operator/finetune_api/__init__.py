"""finetune.dev/v1alpha1: the typed API shared by the operator, the trainer and the generated CRD.

These pydantic models are the single source of truth: `crds/` is generated from them
(`python -m finetune_api.crd`), the operator validates and resolves specs with them, and the
trainer reads its run config through them.
"""

from .runconfig import RunConfig, RunRef
from .spec import (
    GGUF_QUANT_TYPES,
    BaseModelSpec,
    DatasetSpec,
    EvaluationSpec,
    ExportSpec,
    FinetuneJobSpec,
    LoraSpec,
    OutputSpec,
    ResourcesSpec,
    RunPolicySpec,
    S3Spec,
    TrainingSpec,
)
from .status import Artifact, Condition, FinetuneJobStatus, HistoryEntry, Phase, Progress

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FinetuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
SWEEP_KIND = "FinetuneSweep"
SWEEP_PLURAL = "finetunesweeps"
SWEEP_SINGULAR = "finetunesweep"
SWEEP_SHORT_NAMES = ["fts"]

__all__ = [
    "API_VERSION", "GROUP", "KIND", "PLURAL", "SHORT_NAMES", "SINGULAR", "VERSION",
    "SWEEP_KIND", "SWEEP_PLURAL", "SWEEP_SHORT_NAMES", "SWEEP_SINGULAR",
    "GGUF_QUANT_TYPES", "Artifact", "BaseModelSpec", "Condition", "DatasetSpec", "EvaluationSpec",
    "ExportSpec", "FinetuneJobSpec", "FinetuneJobStatus", "HistoryEntry", "LoraSpec", "OutputSpec",
    "Phase", "Progress", "ResourcesSpec", "RunConfig", "RunPolicySpec", "RunRef", "S3Spec",
    "TrainingSpec",
]
