"""Pure: tool arguments → FinetuneJob manifests and spec patches, checked against the API models.

Every spec the server sends was first validated with `FinetuneJobSpec` (the model the CRD is generated
from), so a bad argument is refused with the field named, as admission would, before anything is
created. The apiserver checks again (schema and CEL rules); its 422 message is passed on as it is.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from pydantic import ValidationError

from finetune_api import API_VERSION, KIND
from finetune_api.spec import DEFAULT_BASE_MODEL, GGUF_QUANT_TYPES, FinetuneJobSpec

# Tool parameter -> the spec field it sets, so an error names both.
ARG_PATHS: dict[str, str] = {
    "base_model": "spec.baseModel", "dataset": "spec.dataset.source",
    "dataset_config_map": "spec.dataset.configMapRef", "split": "spec.dataset.split",
    "dataset_format": "spec.dataset.format", "max_samples": "spec.dataset.maxSamples",
    "epochs": "spec.training.epochs", "max_steps": "spec.training.maxSteps",
    "learning_rate": "spec.training.learningRate", "lora_r": "spec.training.lora.r",
    "method": "spec.training.method", "batch_size": "spec.training.batchSize",
    "max_seq_length": "spec.training.maxSeqLength", "quant": "spec.export.gguf",
    "quantization": "spec.export.gguf", "gpus": "spec.resources.gpus", "s3_bucket": "spec.output.s3.bucket",
    "keep_warm_seconds": "spec.runPolicy.keepWarmSeconds",
    "s3_credentials_secret": "spec.output.s3.credentialsSecretRef.name",
    "tasks": "spec.evaluation.tasks", "limit": "spec.evaluation.limit",
    "num_fewshot": "spec.evaluation.numFewshot", "data_uri": "spec.evaluation.dataUri",
    "include_base": "spec.evaluation.includeBase", "eval_quantizations": "spec.evaluation.quantizations",
    "name": "metadata.name", "source": "spec.dataset.source", "config_map": "spec.dataset.configMapRef",
    "format": "spec.dataset.format", "changes": "spec", "spec_overrides": "spec",
}
NAME_MAX = 53  # the operator's Job is <name>-r<run>: leave room under the 63 characters of a label value
K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class InvalidArguments(ValueError):
    """A tool argument (or the spec it builds) is wrong; the message names the field."""


# ----------------------------------------------------------------------------- messages


def _loc(parts: tuple[Any, ...]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def spec_errors(exc: ValidationError, prefix: str = "spec") -> str:
    """`spec.training.epochs: Input should be greater than 0; ...`, the operator's admission wording."""
    parts = []
    for err in exc.errors():
        loc = _loc(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{prefix}.{loc}: {msg}" if loc else f"{prefix}: {msg}")
    return "; ".join(parts)


def argument_errors(exc: ValidationError) -> str:
    """`epochs (spec.training.epochs): Input should be greater than 0`: the tool's name and the API's."""
    chosen: dict[str, tuple[str, str]] = {}  # argument -> (location, message): one per argument
    for err in exc.errors():
        # Union members show up as extra location parts (`quant.literal[...]`, `epochs.float`): drop them.
        loc = _loc(tuple(p for p in err["loc"] if isinstance(p, int) or p.isidentifier()))
        head = loc.split(".", 1)[0].split("[", 1)[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "literal_error" and head in ("quant", "quantization", "quantizations"):
            msg = f"unknown quantization {err.get('input')!r}; known: {', '.join(GGUF_QUANT_TYPES)}"
        elif head in chosen:
            continue  # the first error of a union is the telling one unless a literal names the choices
        chosen[head] = (loc, msg)
    parts = []
    for head, (loc, msg) in chosen.items():
        where = f"{loc} ({ARG_PATHS[head]})" if head in ARG_PATHS else loc
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def validate_spec(spec: dict[str, Any]) -> FinetuneJobSpec:
    try:
        return FinetuneJobSpec.model_validate(spec)
    except ValidationError as exc:
        raise InvalidArguments(spec_errors(exc)) from None


# ----------------------------------------------------------------------------- merge patches


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: what the apiserver does with application/merge-patch+json."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


def diff(old: Any, new: Any) -> dict[str, Any]:
    """The merge patch that turns `old` into `new` (both dicts)."""
    out: dict[str, Any] = {}
    for key in old.keys() | new.keys():
        if key not in new:
            out[key] = None
        elif key not in old or not isinstance(old[key], dict) or not isinstance(new[key], dict):
            if old.get(key) != new[key]:
                out[key] = copy.deepcopy(new[key])
        else:
            sub = diff(old[key], new[key])
            if sub:
                out[key] = sub
    return out


def prune(obj: Any) -> Any:
    """Drops None values (unset tool arguments) and the empty objects they leave."""
    if isinstance(obj, dict):
        out = {k: prune(v) for k, v in obj.items() if v is not None}
        return {k: v for k, v in out.items() if v != {}}
    return obj


# ----------------------------------------------------------------------------- finetune_unsloth


# Ollama-style names an LLM client may pass for the models this project measures.
MODEL_ALIASES = {"gemma3:270m": DEFAULT_BASE_MODEL, "gemma-3-270m": DEFAULT_BASE_MODEL}


def resolve_base_model(base_model: str | None) -> str | None:
    if base_model is None:
        return None
    return MODEL_ALIASES.get(base_model.strip().lower(), base_model.strip())


def base_model_spec(base_model: str | None) -> dict[str, Any] | None:
    """A Hub id goes to `name`; s3://… and local paths (a folder or a .gguf file) go to `uri`."""
    if not base_model:
        return None
    return {"uri": base_model} if base_model.startswith(("s3://", "/")) else {"name": base_model}


def quant_list(quant: str | list[str] | None) -> list[str] | None:
    if quant is None:
        return None
    items = [quant] if isinstance(quant, str) else list(quant)
    return list(dict.fromkeys(items))  # the CRD's list is a set: no duplicates


def job_name(name: str | None) -> str | None:
    if name is None:
        return None
    if len(name) > NAME_MAX or not K8S_NAME.match(name):
        raise InvalidArguments(f"name (metadata.name): {name!r} must be a DNS label of at most {NAME_MAX} "
                               "characters (lower-case letters, digits and '-')")
    return name


def generate_name(base_model: str | None) -> str:
    """A readable prefix for metadata.generateName, from the model's last path segment."""
    stem = (base_model or "finetune").rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf").lower()
    stem = re.sub(r"[^a-z0-9-]+", "-", stem).strip("-")[:40].strip("-") or "finetune"
    return f"{stem}-"


def finetunejob(*, name: str | None, base_model: str | None, dataset: str | None,
                dataset_config_map: dict[str, str] | None, split: str | None, dataset_format: str | None,
                max_samples: int | None, epochs: float | None, max_steps: int | None,
                learning_rate: float | None, lora_r: int | None, method: str | None, batch_size: int | None,
                max_seq_length: int | None, quant: str | list[str] | None, gpus: int | None,
                s3_bucket: str | None, s3_credentials_secret: str | None,
                spec_overrides: dict[str, Any] | None, labels: dict[str, str] | None = None,
                keep_warm_seconds: int | None = None) -> dict[str, Any]:
    """The FinetuneJob the seed's `finetune_unsloth(...)` stands for. Only what the caller set is written;
    the operator resolves every default, as for `kubectl apply`."""
    if (dataset is None) == (dataset_config_map is None):
        raise InvalidArguments("dataset: set exactly one of dataset (a source) and dataset_config_map")
    spec = prune({
        "baseModel": base_model_spec(base_model),
        "dataset": {"source": dataset, "configMapRef": dataset_config_map, "split": split,
                    "format": dataset_format, "maxSamples": max_samples},
        "training": {"epochs": epochs, "maxSteps": max_steps, "learningRate": learning_rate,
                     "lora": {"r": lora_r}, "method": method, "batchSize": batch_size,
                     "maxSeqLength": max_seq_length},
        "export": {"gguf": quant_list(quant)},
        "resources": {"gpus": gpus},
        "output": {"s3": {"bucket": s3_bucket,
                          "credentialsSecretRef": {"name": s3_credentials_secret} if s3_credentials_secret else None}},
        "runPolicy": {"keepWarmSeconds": keep_warm_seconds},
    })
    if spec_overrides:
        spec = merge(spec, spec_overrides)
    validate_spec(spec)
    metadata: dict[str, Any] = {"labels": labels} if labels else {}
    if job_name(name):
        metadata["name"] = name
    else:
        metadata["generateName"] = generate_name(base_model)
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


# ----------------------------------------------------------------------------- patches on an existing job


def _run_identity(spec: dict[str, Any]) -> dict[str, Any]:
    """What decides a run (the operator's spec hash): the spec without runPolicy.suspend."""
    out = copy.deepcopy(spec)
    policy = out.get("runPolicy") or {}
    policy.pop("suspend", None)
    if not policy:
        out.pop("runPolicy", None)
    return out


def rerun_patch(current: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The spec merge patch from `current` to `new`; refuses one that would not start a new run."""
    validate_spec(new)
    if _run_identity(new) == _run_identity(current):
        if new != current:
            raise InvalidArguments("changes: only runPolicy.suspend differs, which suspends or resumes the current "
                                   "run in place; a new run needs a change to the training spec")
        raise InvalidArguments("changes: the spec would stay the same, so the operator would start no new run")
    return diff(current, new)


def training_changes(*, epochs: float | None = None, max_steps: int | None = None,
                     learning_rate: float | None = None, lora_r: int | None = None, batch_size: int | None = None,
                     max_seq_length: int | None = None, quant: str | list[str] | None = None,
                     changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """A merge patch from adjust_and_rerun's arguments. Epochs and maxSteps exclude each other in the API,
    so setting one removes the other."""
    patch = copy.deepcopy(changes or {})
    training: dict[str, Any] = {}
    if epochs is not None:
        training.update(epochs=epochs, maxSteps=None)
    if max_steps is not None:
        training.update(maxSteps=max_steps, epochs=None)
    if epochs is not None and max_steps is not None:
        raise InvalidArguments("epochs, max_steps: set only one of epochs and max_steps (spec.training)")
    for key, value in (("learningRate", learning_rate), ("batchSize", batch_size), ("maxSeqLength", max_seq_length)):
        if value is not None:
            training[key] = value
    if lora_r is not None:
        training["lora"] = {"r": lora_r}
    if training:
        given = patch.get("training") or {}
        if "lora" in training:
            training["lora"] = {**(given.get("lora") or {}), **training["lora"]}
        patch["training"] = {**given, **training}  # None values stay: they remove a field
    if quant is not None:
        patch.setdefault("export", {})["gguf"] = quant_list(quant)
    if not patch:
        raise InvalidArguments("changes: nothing to change; pass changes or one of the training arguments")
    return patch


def export_changes(spec: dict[str, Any], quantization: str) -> dict[str, Any] | None:
    """Adds a GGUF type to export.gguf; None when it is already there."""
    current = list((spec.get("export") or {}).get("gguf") or [])
    if not current and "gguf" not in (spec.get("export") or {}):
        current = list(FinetuneJobSpec.model_fields["export"].get_default(call_default_factory=True).gguf)
    if quantization in current:
        return None
    return {"export": {"gguf": [*current, quantization]}}


def evaluation(*, tasks: list[str], limit: int | None, num_fewshot: int | None, data_uri: str | None,
               quantizations: list[str] | None, include_base: bool | None) -> dict[str, Any]:
    return prune({"tasks": list(dict.fromkeys(tasks)), "limit": limit, "numFewshot": num_fewshot,
                   "dataUri": data_uri, "quantizations": quantizations, "includeBase": include_base})


def with_evaluation(spec: dict[str, Any], ev: dict[str, Any]) -> dict[str, Any]:
    """The spec with spec.evaluation replaced as a whole: fields of an earlier evaluation must not linger."""
    return {**copy.deepcopy(spec), "evaluation": ev}
