"""prepare-dataset: rows → normalized examples → token ids with loss labels → Arrow on disk + report.

Output layout (`out_dir`):
    train.parquet, validation.parquet, parity.parquet   input_ids, labels, length
    report.json                    rows read/used/malformed/truncated, tokens, length percentiles

Nothing is dropped silently: malformed rows (with their row numbers), truncated rows and rows left with
no trainable tokens are all counted in the report.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np

from finetune_api.spec import DatasetSpec, S3Spec, TrainingSpec

from ..chat_templates import ChatTemplate
from ..errors import ConfigError
from .formats import AmbiguousFormat, RowError, detect, normalize
from .sources import load_rows

log = logging.getLogger(__name__)

IGNORE = -100  # label of tokens that carry no loss
MAX_MALFORMED_FRACTION = 0.10  # more than this and the data is wrong, not noisy: fail the run
REPORTED_ERRORS = 50  # row errors listed in report.json (all are counted)
SPLITS = ("train", "validation", "parity")


def _render(tokenizer, template: ChatTemplate, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template.jinja, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def encode_chat(tokenizer, template: ChatTemplate, messages, responses_only: bool) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation; labels only on assistant turns when responses_only.

    An assistant turn's span is what rendering it adds after the generation prompt, so the end-of-turn
    marker is learned too. This relies on the template rendering a prefix of a conversation as a
    prefix of its text, which holds for every template we ship.
    """
    try:
        text = _render(tokenizer, template, messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = _render(tokenizer, template, messages[:i], True) if i else ""
            upto = _render(tokenizer, template, messages[: i + 1], False)
            if not (text.startswith(upto) and upto.startswith(before)):
                raise RowError("the chat template does not render conversations prefix-stably")
            spans.append((len(before), len(upto)))
    except RowError:
        raise
    except Exception as exc:  # jinja raise_exception (e.g. roles that do not alternate)
        raise RowError(f"chat template: {exc}") from exc
    # Templates that render the BOS token themselves must not get a second one from the tokenizer.
    bos = tokenizer.bos_token
    enc = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)), return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    if not responses_only:
        return ids, list(ids)
    labels = [t if any(a <= start < b for a, b in spans) else IGNORE for t, (start, _) in zip(ids, offsets, strict=True)]
    return ids, labels


def encode_raw(tokenizer, prompt: str, completion: str, responses_only: bool) -> tuple[list[int], list[int]]:
    """Text and prompt-completion rows: BOS + prompt + completion + EOS, no template."""
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = head + p + c
    labels = [IGNORE] * (len(head) + len(p)) + c if responses_only else list(ids)
    return ids, labels


def _percentiles(lengths: list[int]) -> dict[str, int]:
    if not lengths:
        return {}
    arr = np.asarray(lengths)
    return {f"p{q}": int(np.percentile(arr, q)) for q in (50, 90, 99)} | {"max": int(arr.max()), "min": int(arr.min())}


def _split(examples: list[dict], validation_split: float, parity_samples: int) -> tuple[dict[str, list], bool]:
    """Validation rows when asked for; else a few held-out rows for the GGUF parity check only."""
    n = len(examples)
    n_val = round(n * validation_split)
    if validation_split > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
        val, train = examples[:n_val], examples[n_val:]
        return {"train": train, "validation": val, "parity": val[:parity_samples]}, False
    n_parity = min(parity_samples, n // 10)
    if n_parity:
        return {"train": examples[n_parity:], "validation": [], "parity": examples[:n_parity]}, False
    # Too few rows to hold any out: the parity check (GGUF vs HF, not generalization) reuses train rows.
    return {"train": examples, "validation": [], "parity": examples[:parity_samples]}, True


def _save(split_rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("length", pa.int32())])
    cols = {name: [r[name] for r in split_rows] for name in schema.names}
    pq.write_table(pa.table(cols, schema=schema), path)


def prepare(dataset: DatasetSpec, training: TrainingSpec, tokenizer, template: ChatTemplate, out_dir: Path,
            *, parity_samples: int = 16, s3: S3Spec | None = None, reporter=None) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_rows(dataset, out_dir / "raw", s3)
    values = [(n, v) for n, v in loaded.rows if not isinstance(v, RowError)]
    try:
        fmt = dataset.format if dataset.format != "auto" else detect([v for _, v in values])
    except AmbiguousFormat as exc:
        raise ConfigError("InvalidDataset", f"{loaded.source}: {exc}") from exc
    log.info("dataset %s: %d rows, format %s", loaded.source, len(loaded.rows), fmt)

    errors: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    for number, value in loaded.rows:
        try:
            if isinstance(value, RowError):
                raise value
            examples.append({"row": number, **normalize(value, fmt)})
        except RowError as exc:
            errors.append({"row": number, "reason": str(exc)})

    random.Random(training.seed).shuffle(examples)
    if dataset.max_samples:
        examples = examples[: dataset.max_samples]

    encoded, truncated, no_labels, lengths = [], 0, 0, []
    max_len = training.max_seq_length
    for i, ex in enumerate(examples):
        try:
            if "messages" in ex:
                ids, labels = encode_chat(tokenizer, template, ex["messages"], training.train_on_responses_only)
            else:
                ids, labels = encode_raw(tokenizer, ex["prompt"], ex["completion"], training.train_on_responses_only)
        except RowError as exc:
            errors.append({"row": ex["row"], "reason": str(exc)})
            continue
        lengths.append(len(ids))
        if len(ids) > max_len:
            truncated += 1
            ids, labels = ids[:max_len], labels[:max_len]
        if all(label == IGNORE for label in labels[1:]):  # the first label is never predicted
            no_labels += 1
            continue
        encoded.append({"input_ids": ids, "labels": labels, "length": len(ids)})
        if reporter and i % 500 == 0:
            reporter.message(f"tokenizing rows: {i}/{len(examples)}")

    read = len(loaded.rows)
    errors.sort(key=lambda e: e["row"])
    for e in errors[:10]:
        log.warning("dataset row %d skipped: %s", e["row"], e["reason"])
    if len(errors) > 10:
        log.warning("... and %d more malformed rows (see report.json)", len(errors) - 10)
    if not encoded:
        raise ConfigError("InvalidDataset", f"{loaded.source}: no usable rows out of {read} "
                          f"({len(errors)} malformed{_first(errors)}, {no_labels} with no trainable tokens)")
    if read and len(errors) / read > MAX_MALFORMED_FRACTION:
        raise ConfigError("InvalidDataset", f"{loaded.source}: {len(errors)} of {read} rows are malformed "
                          f"(more than {MAX_MALFORMED_FRACTION:.0%}){_first(errors)}")

    splits, parity_from_train = _split(encoded, dataset.validation_split, parity_samples)
    for name in SPLITS:
        _save(splits[name], out_dir / f"{name}.parquet")
    report = {
        "source": loaded.source, "format": fmt, "chatTemplate": template.name,
        "maxSeqLength": max_len, "trainOnResponsesOnly": training.train_on_responses_only,
        "rows": {"read": read, "malformed": len(errors), "truncated": truncated, "noTrainableTokens": no_labels,
                 "used": len(encoded), **{name: len(splits[name]) for name in SPLITS}},
        "parityFromTrain": parity_from_train,
        "malformedRows": errors[:REPORTED_ERRORS],
        "tokens": {
            "total": sum(r["length"] for r in encoded),
            "trainable": sum(sum(1 for x in r["labels"][1:] if x != IGNORE) for r in encoded),
            "lengthPercentiles": _percentiles(lengths),  # before truncation
        },
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _first(errors: list[dict]) -> str:
    if not errors:
        return ""
    shown = "; ".join(f"row {e['row']}: {e['reason']}" for e in errors[:3])
    return f"; first: {shown}"


def load_split(out_dir: Path, name: str) -> list[dict[str, Any]]:
    """Rows of a prepared split: input_ids, labels, length."""
    import pyarrow.parquet as pq

    path = out_dir / f"{name}.parquet"
    if not path.exists():
        raise ConfigError("MissingStageOutput", f"{out_dir} has no prepared {name} split (run prepare-dataset first)")
    return pq.read_table(path).to_pylist()
