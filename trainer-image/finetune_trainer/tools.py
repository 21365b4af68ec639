"""The trainer's four tools for an LLM agent, as typed models whose JSON Schemas an agent framework
can bind (`finetune tools --json`), and a dispatcher that runs them (`call`).

    prepare_dataset(source, output_dir, split)          → finetune prepare-dataset
    finetune(base_model, dataset, epochs, learning_rate, lora_r, quant)  → finetune train
    export_gguf(checkpoint_dir, quantization, output_file)               → finetune export-gguf
    run_eval(gguf_file, eval_set)                                        → finetune eval

Field types, bounds and help text are taken from the FinetuneJob API models, so the tools, the CRD
and the run config cannot disagree.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from finetune_api.spec import (
    DEFAULT_BASE_MODEL,
    BaseModelSpec,
    DatasetFormat,
    DatasetSpec,
    EvaluationSpec,
    GgufQuant,
    LoraSpec,
    TrainingSpec,
)


def _like(model: type, name: str, **override: Any) -> Any:
    """A field with the API model's type constraints and description, under a snake_case name."""
    src: FieldInfo = model.model_fields[name]
    required = override.get("default") is Ellipsis
    if required:
        del override["default"]
    info = FieldInfo.merge_field_infos(src, alias=None, validation_alias=None, serialization_alias=None,
                                       alias_priority=None, **override)
    if required:  # required here even where the spec makes it optional
        info.default = PydanticUndefined
    return info


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PrepareDataset(Tool):
    """Load rows (Hugging Face id, s3://, https:// or a local path), detect their format, apply the chat
    template, tokenize, split, and write Parquet files plus report.json to output_dir."""

    source: str = _like(DatasetSpec, "source", default=...)
    output_dir: str = Field(description="Folder for train/validation/parity Parquet files and report.json.")
    split: str = _like(DatasetSpec, "split")
    format: DatasetFormat = _like(DatasetSpec, "format")
    validation_split: float = _like(DatasetSpec, "validation_split")
    base_model: str = Field(DEFAULT_BASE_MODEL, description=(
        "Model whose tokenizer and chat template are used: " + (BaseModelSpec.model_fields["name"].description or "")))
    max_seq_length: int = _like(TrainingSpec, "max_seq_length")


class Finetune(Tool):
    """Fine-tune base_model with LoRA (or QLoRA with quant=4bit) on a dataset made by prepare_dataset.
    Uses Unsloth on a CUDA GPU, transformers + PEFT on CPU. Writes the adapter to output_dir/adapter."""

    base_model: str = Field(DEFAULT_BASE_MODEL, description=(
        "Hugging Face id, a local model folder, or a .gguf file to start from."))
    dataset: str = Field(description="Folder written by prepare_dataset.")
    output_dir: str = Field(description="Work folder: checkpoints/, adapter/, train-log.jsonl, loss-curve.png.")
    epochs: float = _like(TrainingSpec, "epochs", default=1.0)
    max_steps: int | None = _like(TrainingSpec, "max_steps")
    learning_rate: float = _like(TrainingSpec, "learning_rate")
    lora_r: int = _like(LoraSpec, "r")
    quant: Literal["16bit", "4bit"] = Field("16bit", description="16bit: LoRA on a 16-bit base. 4bit: QLoRA (needs a GPU).")


class ExportGguf(Tool):
    """Merge a LoRA adapter (or take a merged model folder) and write a GGUF file with llama.cpp, plus an
    Ollama Modelfile next to it."""

    checkpoint_dir: str = Field(description="An adapter folder (from finetune) or a merged Hugging Face model folder.")
    quantization: GgufQuant = Field("q4_k_m", description="llama.cpp quantization type.")
    output_file: str = Field(description="Path of the .gguf file to write.")
    base_model: str | None = Field(None, description="Base model of the adapter; default: the one recorded in it.")


class RunEval(Tool):
    """Evaluate a GGUF file with lm-evaluation-harness tasks, in process through llama.cpp."""

    gguf_file: str = Field(description="The .gguf file to evaluate.")
    eval_set: list[str] = _like(EvaluationSpec, "tasks")
    limit: int | None = _like(EvaluationSpec, "limit")
    data_uri: str | None = _like(EvaluationSpec, "data_uri")
    output_dir: str = Field("eval", description="Where eval.json and eval.md go.")


TOOLS: dict[str, type[Tool]] = {
    "prepare_dataset": PrepareDataset, "finetune": Finetune, "export_gguf": ExportGguf, "run_eval": RunEval,
}


def schemas() -> list[dict[str, Any]]:
    """OpenAI-style function definitions (also what most agent frameworks accept)."""
    out = []
    for name, model in TOOLS.items():
        schema = model.model_json_schema()
        schema.pop("title", None)
        description = " ".join((schema.pop("description", "") or "").split())
        out.append({"type": "function", "function": {"name": name, "description": description, "parameters": schema}})
    return out


def argv(name: str, args: dict[str, Any]) -> list[str]:
    """The `finetune` command line a tool call stands for."""
    a = TOOLS[name].model_validate(args)
    if isinstance(a, PrepareDataset):
        return ["prepare-dataset", "--source", a.source, "--output-dir", a.output_dir, "--split", a.split,
                "--format", a.format, "--validation-split", str(a.validation_split), "--base-model", a.base_model,
                "--max-seq-length", str(a.max_seq_length)]
    if isinstance(a, Finetune):
        steps = ["--max-steps", str(a.max_steps)] if a.max_steps else ["--epochs", str(a.epochs)]
        return ["train", "--base-model", a.base_model, "--dataset", a.dataset, "--output-dir", a.output_dir,
                *steps, "--learning-rate", str(a.learning_rate), "--lora-r", str(a.lora_r),
                "--method", "qlora" if a.quant == "4bit" else "lora"]
    if isinstance(a, ExportGguf):
        return ["export-gguf", "--checkpoint-dir", a.checkpoint_dir, "--quantization", a.quantization,
                "--output-file", a.output_file, *(["--base-model", a.base_model] if a.base_model else [])]
    assert isinstance(a, RunEval)
    return ["eval", "--gguf", a.gguf_file, "--tasks", ",".join(a.eval_set), "--output-dir", a.output_dir,
            *(["--limit", str(a.limit)] if a.limit else []), *(["--data-uri", a.data_uri] if a.data_uri else [])]


def call(name: str, args: dict[str, Any]) -> int:
    """Runs a tool in this process; returns the command's exit code."""
    from .cli import main

    return main(argv(name, args))
