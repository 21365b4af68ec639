"""Content-addressed caches in the job's S3 bucket: prepared datasets and compile caches.

    s3://<bucket>/<prefix>/<namespace>/.cache/<kind>/<key>/
        <files…>            the entry's files (a dataset's splits and report; a compile cache's tar)
        manifest.json       written last: key, the inputs the key was derived from, each file's sha256 and size

The key is the sha256 of every input that decides the entry's content, so an entry is never looked up
under inputs it was not made from. The namespace is part of the path, so one namespace's jobs cannot
hand another's a poisoned entry (and a Kubernetes name cannot start with ".", so `.cache` never meets
a FinetuneJob's own folder). An entry is trusted only when its manifest names the key asked for and
every file's sha256 and size match the manifest; anything else is a miss: the entry is rebuilt and
written over. Cache trouble (S3 errors included) never fails a run: it only costs the rebuild.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .s3 import S3Store, parse_uri, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CACHE_DIR = ".cache"


def digest(inputs: dict[str, Any]) -> str:
    """The key of a cache entry: sha256 of its inputs as canonical JSON."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def sha256_files(paths: list[Path], root: Path | None = None) -> str:
    """One digest over several files: each file's name (relative to root) and bytes, in the order given."""
    h = hashlib.sha256()
    for p in paths:
        name = p.relative_to(root).as_posix() if root else p.name
        h.update(f"{name}\0{p.stat().st_size}\0".encode())
        h.update(bytes.fromhex(sha256_file(p)))
    return h.hexdigest()


def cache_uri(bucket: str, prefix: str, namespace: str) -> str:
    """The namespace's cache root: s3://<bucket>/<prefix>/<namespace>/.cache/."""
    parts = [p for p in (prefix.strip("/"), namespace, CACHE_DIR) if p]
    return f"s3://{bucket}/{'/'.join(parts)}/"


@dataclass
class Lookup:
    """What a fetch found: hit, or a miss with why (absent, corrupt, mismatched key, unreachable)."""

    hit: bool
    reason: str  # "hit", "absent", "corrupt: …", "mismatch: …", "unavailable: …"
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return "hit" if self.hit else "miss"


class S3Cache:
    """Entries of one kind ("datasets", "compile") under a namespace's cache root."""

    def __init__(self, store: S3Store, root_uri: str, kind: str):
        self.store = store
        self.root = root_uri.rstrip("/") + f"/{kind}/"
        self.kind = kind

    def entry_uri(self, key: str) -> str:
        return f"{self.root}{key}/"

    def fetch(self, key: str, dest: Path) -> Lookup:
        """Downloads the entry into dest and verifies it; dest holds exactly the entry's files on a hit."""
        import time

        t0 = time.monotonic()
        uri = self.entry_uri(key)
        try:
            manifest = self._manifest(uri, dest)
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be read is a miss, not a failure
            return Lookup(False, f"unavailable: {exc}", time.monotonic() - t0)
        if manifest is None:
            return Lookup(False, "absent", time.monotonic() - t0)
        problem = self._check_manifest(manifest, key)
        if problem is None:
            try:
                problem = self._download_verified(uri, manifest["files"], dest)
            except Exception as exc:  # noqa: BLE001
                problem = f"unavailable: {exc}"
        if problem is not None:
            log.warning("cache %s %s: %s; rebuilding it", self.kind, key[:16], problem)
            shutil.rmtree(dest, ignore_errors=True)
            return Lookup(False, problem, time.monotonic() - t0)
        log.info("cache %s %s: hit (%d files, %.1fs)", self.kind, key[:16], len(manifest["files"]),
                 time.monotonic() - t0)
        return Lookup(True, "hit", time.monotonic() - t0)

    def store_entry(self, key: str, src: Path, files: list[str], inputs: dict[str, Any]) -> bool:
        """Uploads files (relative to src), then the manifest; False (logged) when S3 refused."""
        manifest = {"key": key, "kind": self.kind, "inputs": inputs,
                    "files": {f: {"sha256": sha256_file(src / f), "size": (src / f).stat().st_size} for f in files}}
        uri = self.entry_uri(key)
        try:
            for f in files:
                self.store.upload_file(src / f, uri + f)
            tmp = src / f".{MANIFEST}.upload"
            tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
            self.store.upload_file(tmp, uri + MANIFEST, content_type="application/json")  # last: the entry is whole
            tmp.unlink()
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be written only costs the next run
            log.warning("cache %s %s: not stored (%s)", self.kind, key[:16], exc)
            return False
        log.info("cache %s %s: stored %d files", self.kind, key[:16], len(files))
        return True

    # --- helpers -------------------------------------------------------------------------------
    def _manifest(self, uri: str, dest: Path) -> dict | None:
        from botocore.exceptions import ClientError

        bucket, key = parse_uri(uri + MANIFEST)
        try:
            body = self.store.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        try:
            manifest = json.loads(body)
        except ValueError:
            return {"corrupt": "manifest.json is not JSON"}
        return manifest if isinstance(manifest, dict) else {"corrupt": "manifest.json is not an object"}

    @staticmethod
    def _check_manifest(manifest: dict, key: str) -> str | None:
        if "corrupt" in manifest:
            return f"corrupt: {manifest['corrupt']}"
        if manifest.get("key") != key:
            return f"mismatch: the manifest names key {str(manifest.get('key'))[:16]}"
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            return "corrupt: the manifest lists no files"
        for name, meta in files.items():
            if not isinstance(meta, dict) or "sha256" not in meta or "size" not in meta:
                return f"corrupt: no checksum for {name}"
            if name.startswith("/") or ".." in Path(name).parts:
                return f"corrupt: file name {name!r} leaves the entry"
        return None

    def _download_verified(self, uri: str, files: dict[str, dict], dest: Path) -> str | None:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for name, meta in sorted(files.items()):
            path = self.store.download_file(uri + name, dest / name)
            size = path.stat().st_size
            if size != meta["size"]:
                return f"corrupt: {name} has {size} bytes, the manifest says {meta['size']}"
            if sha256_file(path) != meta["sha256"]:
                return f"corrupt: {name} does not match its sha256"
        return None
