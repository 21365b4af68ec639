"""The export cache: a GGUF already made from the same adapter is downloaded, not merged and converted again.

A run that reuses an earlier run's adapter (train/trained_cache.py) would otherwise merge, convert, quantize
and parity-check the very files that run already uploaded. An entry (cache.py's layout, kind "exports")
is a pointer, not a copy: exported.json names the GGUF among the artifacts of the run that made it (an
s3:// URI under the same namespace's prefix), its sha256 and size, and its parity result. The key: the
adapter's training key, the quantization, the model name written into the GGUF, the chat template,
llama.cpp's version, the export code and the parity settings. A hit downloads the file and checks its
sha256 and size; a file that was deleted or changed since is a miss, and that type is exported again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ..data.chat_templates import ChatTemplate
from ..paths import LLAMA_CPP_VERSION
from ..storage.cache import Lookup, S3Cache, digest, sha256_files
from ..storage.s3 import S3Store, sha256_file

log = logging.getLogger(__name__)

POINTER = "exported.json"
CODE_FILES = ("export.py", "parity.py", "modelfile.py", "tokenizer_files.py", "chat_templates.py")


def code_version() -> str:
    here = Path(__file__).resolve().parent
    return sha256_files([here / name for name in CODE_FILES if (here / name).is_file()])[:16]


def entry_key(adapter_key: str, quant: str, name: str, template: ChatTemplate, export_spec) -> tuple[str, dict]:
    """The entry's key and the inputs it is the digest of."""
    inputs = {"adapter": adapter_key, "quantization": quant, "name": name,
            "chatTemplate": {"name": template.name, "sha256": hashlib.sha256(template.jinja.encode()).hexdigest()},
            "llamaCpp": LLAMA_CPP_VERSION, "code": code_version(),
            "parity": {"check": export_spec.parity_check, "samples": export_spec.parity_samples}}
    return digest(inputs), inputs


PARITY_FIELDS = {"top1Agreement", "perplexity", "referencePerplexity", "tokens"}  # parity.compare's


def parity_shaped(result: Any) -> bool:
    """Whether a cached parity result has parity.compare's fields, numbers all (or is empty: none was run)."""
    return isinstance(result, dict) and set(result) <= PARITY_FIELDS and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in result.values())


class ExportCache:
    """Lookups before the export and pointers after the upload, for one run."""

    def __init__(self, cache: S3Cache, store: S3Store, namespace_uri: str, staging: Path):
        self.cache, self.store, self.staging = cache, store, staging
        self.namespace_uri = namespace_uri.rstrip("/") + "/"  # pointers may lead only below it
        self.report: dict[str, str] = {}  # quantization → hit, or miss and why

    def restore(self, key: str, quant: str, dest: Path) -> dict | None:
        """The GGUF of an earlier run at dest, and its parity result ({} when none was run); None on a miss."""
        lookup = self.cache.fetch(key, self.staging)
        pointer = None
        if lookup.hit:
            pointer, lookup = self._fetch_pointed(json.loads((self.staging / POINTER).read_text()), dest, lookup)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.report[quant] = lookup.label if lookup.hit else f"miss: {lookup.reason}"
        if pointer is None:
            return None
        return pointer.get("parity") or {}

    def _fetch_pointed(self, pointer: Any, dest: Path, lookup: Lookup) -> tuple[dict | None, Lookup]:
        uri = pointer.get("uri") if isinstance(pointer, dict) else None
        if not isinstance(uri, str) or not uri.startswith(self.namespace_uri) or "/../" in uri:
            return None, Lookup(False, "corrupt: the pointer leaves the namespace's prefix", lookup.seconds)
        try:
            self.store.download_file(uri, dest)
        except Exception as exc:  # noqa: BLE001 - the pointed file is gone: export it again
            return None, Lookup(False, f"absent: {uri} ({type(exc).__name__})", lookup.seconds)
        if dest.stat().st_size != pointer.get("size") or sha256_file(dest) != pointer.get("sha256"):
            dest.unlink()
            return None, Lookup(False, f"changed: {uri} no longer matches its checksum", lookup.seconds)
        parity = pointer.get("parity") or {}
        if not parity_shaped(parity):  # it goes into the status: only what parity.compare writes
            dest.unlink()
            return None, Lookup(False, "corrupt: the pointer's parity result is not parity's", lookup.seconds)
        return pointer, lookup

    def store_pointer(self, key: str, inputs: dict[str, Any], artifact: dict[str, Any], parity: dict | None) -> bool:
        """After the upload: where this run's GGUF of one type is, for the next run with the same adapter."""
        self.staging.mkdir(parents=True, exist_ok=True)
        (self.staging / POINTER).write_text(json.dumps(
            {"uri": artifact["uri"], "sha256": artifact["sha256"], "size": artifact["sizeBytes"],
             "parity": parity or {}}, sort_keys=True))
        stored = self.cache.store_entry(key, self.staging, [POINTER], inputs)
        shutil.rmtree(self.staging, ignore_errors=True)
        return stored
