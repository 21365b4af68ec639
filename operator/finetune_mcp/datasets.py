"""prepare_dataset: validate and preview a dataset in process, before any GPU is asked for.

It reuses the trainer's own readers and format rules (finetune_trainer.data: sources and formats,
which need no torch), so the preview says what the Preparing stage will say: the format detected, the
rows read, which rows are malformed and why (with their row numbers), and lengths — in tokens when the
base model's tokenizer can be loaded here (transformers, from a local folder or the Hub cache), else
in characters, saying why. Without the trainer package it refuses clearly instead of guessing.

Where rows may come from: a ConfigMap key (read with the caller's identity), https://, s3:// (with this
server's ambient S3 credentials; a FinetuneJob's credentials Secret is never read), a Hugging Face id
(needs the `datasets` package and the Hub or its cache), and a path on this server's disk only where
local paths are allowed (the stdio default; off over HTTP, where the caller is remote).
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

from finetune_api.spec import DatasetSpec, S3Spec, TrainingSpec

from .jobs import InvalidArguments

PREVIEW_CHARS = 300  # per message, in the preview rows
MALFORMED_LISTED = 20


class Unavailable(RuntimeError):
    """What the preview needs is not installed or not reachable here; the message says what."""


def trainer_available() -> bool:
    return importlib.util.find_spec("finetune_trainer") is not None


def _percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    ordered = sorted(values)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]

    return {"min": ordered[0], "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": ordered[-1]}


def _is_local(source: str) -> bool:
    return not source.startswith(("s3://", "https://", "http://")) and (
        source.startswith(("/", ".", "~")) or Path(source).expanduser().exists())


def load_rows(spec: DatasetSpec, *, config_map_text: str | None, allow_local_paths: bool,
              s3_endpoint: str | None, workdir: Path) -> tuple[str, list[tuple[int, Any]]]:
    """(source label, [(row number, value or RowError)]) through the trainer's readers."""
    from finetune_trainer.data import sources
    from finetune_trainer.errors import TrainerError

    try:
        if config_map_text is not None:
            ref = spec.config_map_ref
            path = workdir / Path(ref.key).name  # the key's suffix picks the reader, as in the trainer
            path.write_text(config_map_text)
            return f"configmap:{ref.name}/{ref.key}", sources.read_file(path)
        source = spec.source or ""
        if _is_local(source) and not allow_local_paths:
            raise InvalidArguments(f"dataset: {source!r} is a path on the MCP server's disk, which this server does "
                                   "not read (FINETUNE_MCP_ALLOW_LOCAL_PATHS); use a ConfigMap, s3:// or https://")
        if not _is_local(source) and not source.startswith(("s3://", "https://", "http://")) \
                and importlib.util.find_spec("datasets") is None:
            raise Unavailable(f"dataset: {source!r} is a Hugging Face dataset id, and reading one needs the "
                              "`datasets` package (the trainer extra), absent here; the trainer will read it in "
                              "its Preparing stage")
        s3 = S3Spec(endpoint=s3_endpoint, force_path_style=bool(s3_endpoint)) if source.startswith("s3://") else None
        loaded = sources.load_rows(spec, workdir / "raw", s3)
        return loaded.source, loaded.rows
    except TrainerError as exc:
        raise InvalidArguments(f"dataset: {exc.message} ({exc.reason})") from None


class Lengths:
    """Token lengths with the base model's tokenizer and chat template, else character lengths."""

    def __init__(self, base_model: str | None, training: TrainingSpec, allow_local_paths: bool):
        self.training = training
        self.unit, self.note, self.tokenizer, self.template = "characters", None, None, None
        if not base_model:
            self.note = "no base_model given: lengths are in characters"
            return
        if base_model.startswith("s3://") or base_model.endswith(".gguf"):
            self.note = f"{base_model}: its tokenizer is not loaded here (s3:// or .gguf); lengths are in characters"
            return
        if _is_local(base_model) and not allow_local_paths:
            self.note = "base_model is a local path, which this server does not read: lengths are in characters"
            return
        if importlib.util.find_spec("transformers") is None:
            self.note = "transformers (the trainer extra) is not installed here: lengths are in characters"
            return
        try:
            from finetune_trainer.data import chat_templates
            from finetune_trainer.train.model_loading import BaseModel, load_tokenizer

            self.tokenizer = load_tokenizer(BaseModel(base_model))
            self.template = chat_templates.resolve(training.chat_template, self.tokenizer)
            self.unit = "tokens"
        except Exception as exc:  # noqa: BLE001 - any failure only downgrades the unit
            self.note = f"tokenizer of {base_model} could not be loaded here ({str(exc).splitlines()[0][:200]}): " \
                        "lengths are in characters"

    def measure(self, example: dict[str, Any]) -> int:
        """Length of one normalized example; raises the trainer's RowError for a row its template refuses."""
        if self.tokenizer is None:
            if "messages" in example:
                return sum(len(m["content"]) for m in example["messages"])
            return len(example["prompt"]) + len(example["completion"])
        from finetune_trainer.data.prepare import encode_chat, encode_raw

        responses_only = self.training.train_on_responses_only
        if "messages" in example:
            ids, _ = encode_chat(self.tokenizer, self.template, example["messages"], responses_only)
        else:
            ids, _ = encode_raw(self.tokenizer, example["prompt"], example["completion"], responses_only)
        return len(ids)


def _clip(example: dict[str, Any]) -> dict[str, Any]:
    def cut(text: str) -> str:
        return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "…"

    if "messages" in example:
        return {"messages": [{"role": m["role"], "content": cut(m["content"])} for m in example["messages"]]}
    return {"prompt": cut(example["prompt"]), "completion": cut(example["completion"])}


def preview(spec: DatasetSpec, training: TrainingSpec, *, base_model: str | None, config_map_text: str | None,
            allow_local_paths: bool, s3_endpoint: str | None, preview_rows: int) -> dict[str, Any]:
    """The report prepare_dataset returns. Raises InvalidArguments (the caller's to fix) or Unavailable."""
    if not trainer_available():
        raise Unavailable("prepare_dataset runs the trainer's dataset readers in process, and the trainer package "
                          "(finetune_trainer) is not installed with this server; install finetune-operator with "
                          "it, or rely on the FinetuneJob's Preparing stage, which fails with the row numbers of "
                          "malformed rows (reason InvalidDataset)")
    from finetune_trainer.data.formats import AmbiguousFormat, RowError, detect, normalize
    from finetune_trainer.data.prepare import MAX_MALFORMED_FRACTION

    with tempfile.TemporaryDirectory(prefix="finetune-mcp-") as tmp:
        source, rows = load_rows(spec, config_map_text=config_map_text, allow_local_paths=allow_local_paths,
                                 s3_endpoint=s3_endpoint, workdir=Path(tmp))
    values = [v for _, v in rows if not isinstance(v, RowError)]
    try:
        fmt = spec.format if spec.format != "auto" else detect(values)
    except AmbiguousFormat as exc:
        raise InvalidArguments(f"dataset_format (spec.dataset.format): {source}: {exc}") from None

    lengths_of = Lengths(base_model, training, allow_local_paths)
    errors: list[dict[str, Any]] = []
    lengths: list[int] = []
    shown: list[dict[str, Any]] = []
    for number, value in rows:
        try:
            if isinstance(value, RowError):
                raise value
            example = normalize(value, fmt)
            lengths.append(lengths_of.measure(example))
        except RowError as exc:
            errors.append({"row": number, "reason": str(exc)})
            continue
        if len(shown) < preview_rows:
            shown.append({"row": number, **_clip(example)})

    read = len(rows)
    malformed_fraction = len(errors) / read if read else 0.0
    report: dict[str, Any] = {
        "source": source, "format": fmt, "formatDetected": spec.format == "auto",
        "rows": {"read": read, "usable": len(lengths), "malformed": len(errors)},
        "malformedRows": errors[:MALFORMED_LISTED],
        "lengths": {"unit": lengths_of.unit, **_percentiles(lengths)},
        "preview": shown,
    }
    if lengths_of.note:
        report["lengths"]["note"] = lengths_of.note
    if lengths_of.unit == "tokens":
        over = sum(1 for n in lengths if n > training.max_seq_length)
        report["lengths"].update(maxSeqLength=training.max_seq_length, overMaxSeqLength=over,
                                 totalTokens=sum(lengths))
    problems = []
    if not lengths:
        problems.append("no usable rows: training would fail with InvalidDataset")
    elif malformed_fraction > MAX_MALFORMED_FRACTION:
        problems.append(f"{len(errors)} of {read} rows are malformed (more than {MAX_MALFORMED_FRACTION:.0%}): "
                        "training would fail with InvalidDataset")
    elif errors:
        problems.append(f"{len(errors)} malformed rows would be skipped (and counted) by the trainer")
    report["trainable"] = bool(lengths) and malformed_fraction <= MAX_MALFORMED_FRACTION
    if problems:
        report["problems"] = problems
    return report
