"""prepare-dataset: rows → normalized examples → token ids with loss labels → Arrow on disk + report.

Output layout (`out_dir`):
    train.parquet, validation.parquet, parity.parquet   input_ids, labels, length
    report.json                    rows read/used/malformed/truncated, tokens, length percentiles

Nothing is dropped silently: malformed rows (with their row numbers), truncated rows and rows left with
no trainable tokens are all counted in the report.

Rows are encoded in worker processes on large sets (rendering the chat template is Python, so threads
would not help); the result is the same as encoding them one by one. With a cache (storage/cache.py), the
prepared files are content-addressed in S3: a re-run on the same source bytes, tokenizer, template,
maxSeqLength and options downloads and verifies them instead of tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from finetune_api.spec import DatasetSpec, S3Spec, TrainingSpec

from ..errors import ConfigError
from ..storage.cache import Lookup, S3Cache, digest, sha256_files
from . import IGNORE
from .chat_templates import ChatTemplate
from .formats import AmbiguousFormat, RowError, detect, normalize
from .sources import Rows, load_rows

log = logging.getLogger(__name__)

MAX_MALFORMED_FRACTION = 0.10  # more than this and the data is wrong, not noisy: fail the run
REPORTED_ERRORS = 50  # row errors listed in report.json (all are counted)
SPLITS = ("train", "validation", "parity")
ENV_WORKERS = "FINETUNE_PREPARE_WORKERS"  # processes that encode rows; default: the CPUs this process may use
MAX_WORKERS = 32
PARALLEL_MIN_ROWS = 2000  # below this, starting processes costs more than it saves
CHUNK_ROWS = 500
# The code whose output a cached dataset is: any change to these files makes new cache keys.
CODE_FILES = ("prepare.py", "formats.py", "sources.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                   "vocab.txt", "spiece.model")


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
    lengths = np.asarray([len(r["input_ids"]) for r in split_rows], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    def column(name: str):
        values = np.concatenate([np.asarray(r[name], dtype=np.int32) for r in split_rows]) if split_rows else \
            np.zeros(0, dtype=np.int32)
        return pa.ListArray.from_arrays(offsets, pa.array(values, type=pa.int32()))

    table = pa.Table.from_arrays([column("input_ids"), column("labels"), pa.array(lengths, type=pa.int32())],
                                 schema=schema)
    pq.write_table(table, path)


# ------------------------------------------------------------------------ encoding, in parallel
def encode_example(tokenizer, template: ChatTemplate, example: dict, responses_only: bool):
    """(ids, labels) as int32 arrays, or the RowError that makes the row malformed."""
    try:
        if "messages" in example:
            ids, labels = encode_chat(tokenizer, template, example["messages"], responses_only)
        else:
            ids, labels = encode_raw(tokenizer, example["prompt"], example["completion"], responses_only)
    except RowError as exc:
        return RowError(str(exc))
    return np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)


_FORKED: dict[str, Any] = {}  # what forked workers inherit: the tokenizer and template, never pickled


def _encode_chunk(chunk: list[dict]) -> list:
    tokenizer, template, responses_only = _FORKED["args"]
    return [encode_example(tokenizer, template, ex, responses_only) for ex in chunk]


def prepare_workers() -> int:
    if os.environ.get(ENV_WORKERS):
        return max(1, int(os.environ[ENV_WORKERS]))
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


def encode_all(examples: list[dict], tokenizer, template: ChatTemplate, responses_only: bool, workers: int,
               min_rows: int = PARALLEL_MIN_ROWS) -> list:
    """encode_example over every row, in order; in `workers` forked processes on large sets."""
    if workers <= 1 or len(examples) < min_rows:
        return [encode_example(tokenizer, template, ex, responses_only) for ex in examples]
    chunks = [examples[i:i + CHUNK_ROWS] for i in range(0, len(examples), CHUNK_ROWS)]
    _FORKED["args"] = (tokenizer, template, responses_only)
    # The fast tokenizer's own thread pool must stay off in forked children (it cannot survive a fork).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=multiprocessing.get_context("fork")) as pool:
            return [r for chunk in pool.map(_encode_chunk, chunks) for r in chunk]
    finally:
        _FORKED.clear()


# ------------------------------------------------------------------ the prepared-dataset cache
def code_version() -> str:
    here = Path(__file__).resolve().parent
    return sha256_files([here / name for name in CODE_FILES])[:16]


def tokenizer_identity(tokenizer) -> dict[str, Any]:
    """The tokenizer's files' digest (its folder's, else what save_pretrained writes) and versions."""
    import tempfile

    import tokenizers
    import transformers

    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    files = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()] if folder.is_dir() else []
    if files:
        files_digest = sha256_files(files, folder)
    else:  # a Hub id: hash what the tokenizer is, as saved
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            files_digest = sha256_files(sorted(p for p in Path(tmp).iterdir() if p.is_file()), Path(tmp))
    return {"class": type(tokenizer).__name__, "files": files_digest, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "bos": tokenizer.bos_token, "eos": tokenizer.eos_token}


def source_digest(loaded: Rows) -> str:
    """sha256 over the source's bytes, or over its rows as JSON where no file holds them."""
    if loaded.files:
        return sha256_files(loaded.files, Path(os.path.commonpath([str(p.parent) for p in loaded.files])))
    h = hashlib.sha256()
    for number, value in loaded.rows:
        h.update(json.dumps([number, str(value) if isinstance(value, RowError) else value], sort_keys=True,
                            default=str).encode())
    return h.hexdigest()


def cache_inputs(dataset: DatasetSpec, training: TrainingSpec, tokenizer, template: ChatTemplate,
                 parity_samples: int, source: str) -> dict[str, Any]:
    """Everything the prepared files depend on; the cache key is their digest."""
    return {
        "source": source, "code": code_version(), "tokenizer": tokenizer_identity(tokenizer),
        "chatTemplate": {"name": template.name, "sha256": hashlib.sha256(template.jinja.encode()).hexdigest()},
        "format": dataset.format, "split": dataset.split, "validationSplit": dataset.validation_split,
        "maxSamples": dataset.max_samples, "seed": training.seed, "maxSeqLength": training.max_seq_length,
        "trainOnResponsesOnly": training.train_on_responses_only, "paritySamples": parity_samples,
    }


def _prepared_files() -> list[str]:
    return [f"{name}.parquet" for name in SPLITS] + ["report.json"]


def _cache_report(lookup: Lookup, key: str, stored: bool | None = None) -> dict[str, Any]:
    return {"dataset": lookup.label, "reason": lookup.reason, "key": key[:16],
            "lookupSeconds": round(lookup.seconds, 2), **({"stored": stored} if stored is not None else {})}


def prepare(dataset: DatasetSpec, training: TrainingSpec, tokenizer, template: ChatTemplate, out_dir: Path,
            *, parity_samples: int = 16, s3: S3Spec | None = None, reporter=None,
            cache: S3Cache | None = None) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_rows(dataset, out_dir / "raw", s3)
    if cache is None:
        return _prepare(loaded, dataset, training, tokenizer, template, out_dir, parity_samples, reporter)
    inputs = cache_inputs(dataset, training, tokenizer, template, parity_samples, source_digest(loaded))
    key = digest(inputs)
    staging = out_dir.parent / f".{out_dir.name}-cached"
    lookup = cache.fetch(key, staging)
    if lookup.hit and not all((staging / name).is_file() for name in _prepared_files()):
        lookup = Lookup(False, "corrupt: the entry lacks prepared files", lookup.seconds)
    if lookup.hit:
        for name in _prepared_files():
            shutil.move(staging / name, out_dir / name)
        shutil.rmtree(staging, ignore_errors=True)
        report = json.loads((out_dir / "report.json").read_text())
        report["source"] = loaded.source  # the same bytes may come from another place this time
        report["tokenizerClass"] = type(tokenizer).__name__  # part of the key: the same as the entry's
        report["cache"] = _cache_report(lookup, key)
        (out_dir / "report.json").write_text(json.dumps(report, indent=2))
        return report
    shutil.rmtree(staging, ignore_errors=True)
    report = _prepare(loaded, dataset, training, tokenizer, template, out_dir, parity_samples, reporter)
    t0 = time.monotonic()
    stored = cache.store_entry(key, out_dir, _prepared_files(), inputs)
    log.info("dataset cache entry written in %.2f s", time.monotonic() - t0)
    report["cache"] = _cache_report(lookup, key, stored)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _prepare(loaded: Rows, dataset: DatasetSpec, training: TrainingSpec, tokenizer, template: ChatTemplate,
             out_dir: Path, parity_samples: int, reporter) -> dict[str, Any]:
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
    if reporter:
        reporter.message(f"tokenizing {len(examples)} rows")
    t0, workers = time.monotonic(), prepare_workers()
    results = encode_all(examples, tokenizer, template, training.train_on_responses_only, workers)
    log.info("encoded %d rows in %.2f s (%d processes)", len(examples), time.monotonic() - t0, workers)
    for ex, result in zip(examples, results, strict=True):
        if isinstance(result, RowError):
            errors.append({"row": ex["row"], "reason": str(result)})
            continue
        ids, labels = result
        lengths.append(len(ids))
        if len(ids) > max_len:
            truncated += 1
            ids, labels = ids[:max_len], labels[:max_len]
        if not (labels[1:] != IGNORE).any():  # the first label is never predicted
            no_labels += 1
            continue
        encoded.append({"input_ids": ids, "labels": labels, "length": len(ids)})

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
        "tokenizerClass": type(tokenizer).__name__,  # what a run's parent checks the dataset child's against
        "maxSeqLength": max_len, "trainOnResponsesOnly": training.train_on_responses_only,
        "rows": {"read": read, "malformed": len(errors), "truncated": truncated, "noTrainableTokens": no_labels,
                 "used": len(encoded), **{name: len(splits[name]) for name in SPLITS}},
        "parityFromTrain": parity_from_train,
        "malformedRows": errors[:REPORTED_ERRORS],
        "tokens": {
            "total": int(sum(r["length"] for r in encoded)),
            "trainable": int(sum(int((r["labels"][1:] != IGNORE).sum()) for r in encoded)),
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
