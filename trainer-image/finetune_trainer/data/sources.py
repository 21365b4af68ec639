"""Reading rows from wherever the dataset is: a local file or folder, s3://, https://, a Hugging Face
dataset id, or a ConfigMap key the operator mounted.

Rows come back as (row_number, value) pairs, 1-based in the source's own order (the line number for
JSON Lines), or as a RowError for a line that is not even JSON, so prepare can report it.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_api import contract
from finetune_api.spec import DatasetSpec, S3Spec

from ..errors import ConfigError, TransientError
from ..storage.egress_guard import EgressDenied
from .formats import RowError

log = logging.getLogger(__name__)

ENV_DATASET_FILE = contract.ENV_DATASET_FILE  # the mounted ConfigMap key (the operator sets it)
CONFIGMAP_DIR = Path(contract.DATASET_MOUNT)
HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".txt")
RETRY_BACKOFF_SECONDS = 2.0


@dataclass
class Rows:
    source: str
    rows: list[tuple[int, Any]] = field(default_factory=list)  # value or RowError
    # The files the rows were read from, in reading order (for the prepared-dataset cache's key);
    # None where no file holds them (a Hub dataset read through `datasets`).
    files: list[Path] | None = None


def _read_text_rows(text: str, name: str) -> list[tuple[int, Any]]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError("InvalidDataset", f"{name}: not a valid JSON array ({exc})") from exc
        return list(enumerate(data, 1))
    if stripped.startswith("{") and not name.endswith((".jsonl", ".ndjson")):
        try:  # one JSON object: {"train": [...]} or {"data": [...]}
            data = json.loads(text)
            for key in ("train", "data", "rows"):
                if isinstance(data.get(key), list):
                    return list(enumerate(data[key], 1))
        except json.JSONDecodeError:
            pass  # JSON Lines after all
    rows: list[tuple[int, Any]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            rows.append((number, RowError(f"not valid JSON ({exc.msg} at column {exc.colno})")))
    return rows


def read_file(path: Path) -> list[tuple[int, Any]]:
    name = path.name.lower()
    opener = gzip.open if name.endswith(".gz") else open
    name = name.removesuffix(".gz")
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), 1))
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if name.endswith(".csv"):
        return list(enumerate(csv.DictReader(io.StringIO(text)), 1))
    return _read_text_rows(text, name)


def data_files(path: Path) -> list[Path]:
    """The files a folder's rows come from: the data files read_dir reads, or a saved dataset's files."""
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().removesuffix(".gz").endswith(SUFFIXES))


def read_dir(path: Path, split: str) -> list[tuple[int, Any]]:
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        if hasattr(ds, "keys"):  # DatasetDict
            if split not in ds:
                raise ConfigError("InvalidDataset", f"{path}: no split {split!r} (has {', '.join(ds.keys())})")
            ds = ds[split]
        return list(enumerate(ds, 1))
    files = data_files(path)
    if not files:
        raise ConfigError("InvalidDataset", f"{path}: no data files ({', '.join(SUFFIXES)})")
    # Row numbers continue across files so each row has one number in the report.
    rows: list[tuple[int, Any]] = []
    for f in files:
        offset = len(rows)
        rows += [(offset + n, v) for n, v in read_file(f)]
    return rows


HUB_HOST = "huggingface.co"


def is_hub_url(url: str) -> bool:
    """An https URL of the Hugging Face Hub itself or a subdomain of it: the only place HF_TOKEN goes.
    The parsed host is compared, never the text (`https://evil.example/huggingface.co.jsonl`)."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").rstrip(".").lower()
    return parts.scheme == "https" and (host == HUB_HOST or host.endswith("." + HUB_HOST))


class _TokenStaysOnTheHub(urllib.request.HTTPRedirectHandler):
    """urllib carries every header across a redirect: the token is dropped when one leaves the Hub."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and not is_hub_url(newurl):
            new.remove_header("Authorization")
        return new


def _download_https(url: str, dest: Path, attempts: int = 4) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    name = Path(urllib.parse.urlsplit(url).path).name or "data.jsonl"
    target = dest / name
    headers = {}
    if os.environ.get("HF_TOKEN") and is_hub_url(url):
        headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    opener = urllib.request.build_opener(_TokenStaysOnTheHub)
    for attempt in range(1, attempts + 1):
        try:
            with opener.open(urllib.request.Request(url, headers=headers), timeout=60) as r:
                target.write_bytes(r.read())
            return target
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code != 429:
                raise ConfigError("DatasetNotFound" if exc.code == 404 else "InvalidDataset",
                                  f"{url}: HTTP {exc.code}") from exc
            err: Exception = exc
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            if isinstance(getattr(exc, "reason", exc), EgressDenied):
                raise ConfigError("EgressDenied", f"dataset.source: {getattr(exc, 'reason', exc)}") from exc
            err = exc
        if attempt == attempts:
            raise TransientError("DatasetUnavailable", f"{url}: {err}") from err
        time.sleep(RETRY_BACKOFF_SECONDS * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _load_hub(spec: DatasetSpec) -> list[tuple[int, Any]]:
    import datasets

    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    try:
        ds = datasets.load_dataset(spec.source, split=spec.split, token=os.environ.get("HF_TOKEN") or None)
    except (ConnectionError, TimeoutError) as exc:
        if offline:
            raise ConfigError("DatasetNotFound", f"{spec.source}: not in the local cache and "
                                                 "HF_HUB_OFFLINE is set") from exc
        raise TransientError("DatasetUnavailable", f"{spec.source}: {exc}") from exc
    except FileNotFoundError as exc:
        raise ConfigError("DatasetNotFound", f"{spec.source}: {exc}" + (" (offline mode)" if offline else "")) from exc
    except ValueError as exc:  # unknown split and similar
        raise ConfigError("InvalidDataset", f"{spec.source}: {exc}") from exc
    except Exception as exc:
        if type(exc).__name__ in ("DatasetNotFoundError", "RepositoryNotFoundError", "GatedRepoError"):
            raise ConfigError("DatasetNotFound", f"{spec.source}: {exc}") from exc
        raise
    return list(enumerate(ds, 1))


def load_rows(spec: DatasetSpec, download_dir: Path, s3: S3Spec | None = None) -> Rows:
    if spec.config_map_ref is not None:
        ref = spec.config_map_ref
        path = Path(os.environ.get(ENV_DATASET_FILE) or CONFIGMAP_DIR / ref.key)
        if not path.is_file():
            raise ConfigError("DatasetNotFound", f"ConfigMap {ref.name} key {ref.key} is not mounted at {path}")
        return Rows(f"configmap:{ref.name}/{ref.key}", _read_text_rows(path.read_text(), ref.key), [path])

    source = spec.source or ""
    if source.startswith("s3://"):
        from ..storage.s3 import S3Store

        if s3 is None:
            raise ConfigError("InvalidSpec", "an s3:// dataset needs output.s3 for the endpoint and region")
        store = S3Store(s3)
        if source.endswith("/"):
            store.download_prefix(source, download_dir)
            return Rows(source, read_dir(download_dir, spec.split), data_files(download_dir))
        local = store.download_file(source, download_dir / Path(source).name)
        return Rows(source, read_file(local), [local])
    if source.startswith(("https://", "http://")):
        local = _download_https(source, download_dir)
        return Rows(source, read_file(local), [local])
    path = Path(source).expanduser()
    if path.is_file():
        return Rows(source, read_file(path), [path])
    if path.is_dir():
        return Rows(source, read_dir(path, spec.split), data_files(path))
    if source.startswith(("/", ".", "~")) or not HF_ID.match(source):
        raise ConfigError("DatasetNotFound", f"dataset {source!r} does not exist")
    return Rows(f"hf:{source}", _load_hub(spec))
