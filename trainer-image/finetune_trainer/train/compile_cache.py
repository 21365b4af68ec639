"""Persistent compile caches: torch.compile's artifacts, Inductor's and Triton's kernels and Unsloth's
generated modules, kept in S3.

A GPU run spends ~30 s compiling before its first step (Dynamo's tracing, Inductor's lowering, Triton's
kernels). The compilers keep what they made on disk; the trainer points their caches into one folder
before anything compiles (use_dirs), restores an archive of them from S3 before the model loads, and,
after a run that missed, archives them back. torch's own record of what it compiled (FX graphs,
AOTAutograd entries, Triton kernels: torch.compiler.save_cache_artifacts) is what lets a new process skip
the compilation; Inductor's folder alone does not, since Unsloth unsets TORCHINDUCTOR_CACHE_DIR at import.
The key is every input that decides what gets compiled: the model's config, the shapes (micro-batch,
maxSeqLength, packing, checkpointing, LoRA shape), the versions of torch, triton, transformers,
Unsloth and CUDA, the GPU's name and Unsloth's switches. The integrity rules are cache.py's: a checksum or key mismatch is a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

from ..storage.cache import Lookup, S3Cache

log = logging.getLogger(__name__)

ENV_DIRS = {"inductor": "TORCHINDUCTOR_CACHE_DIR", "triton": "TRITON_CACHE_DIR",
            "unsloth": "UNSLOTH_COMPILE_LOCATION"}
# torch.compile's artifacts of a run, as torch.compiler.save_cache_artifacts serializes them.
ARTIFACTS_DIR, ARTIFACTS = "artifacts", "torch-compile.bin"
# Inductor's FX-graph and AOTAutograd caches: what lets a warm cache skip compiling, not only codegen.
ENV_ON = {"TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
ARCHIVE = "compile-cache.tar"
ENV_ROOT = "FINETUNE_COMPILE_CACHE_DIR"
PACKAGES = ("torch", "triton", "transformers", "peft", "unsloth", "unsloth_zoo")


def default_root() -> Path:
    """One fixed place, not under the workdir: generated modules' paths end up in what gets compiled, so a
    cache restored at another path could miss. $FINETUNE_COMPILE_CACHE_DIR, else <tmp>/finetune-compile-cache."""
    import tempfile

    return Path(os.environ.get(ENV_ROOT) or Path(tempfile.gettempdir()) / "finetune-compile-cache")


def use_dirs(root: Path) -> dict[str, Path]:
    """Points the compilers' caches into root; a cache directory the environment sets already wins.

    Call before torch or Unsloth import: Unsloth reads its location once, at import.
    """
    dirs = {ARTIFACTS_DIR: root / ARTIFACTS_DIR}
    for name, var in ENV_DIRS.items():
        os.environ.setdefault(var, str(root / name))
        dirs[name] = Path(os.environ[var])
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    for var, value in ENV_ON.items():
        os.environ.setdefault(var, value)
    return dirs


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def gpu() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu"}
    return {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "cuda": torch.version.cuda}


def model_identity(source: str, revision: str | None = None) -> str:
    """The model's config.json digest where it is a folder (weights do not change kernels), else its name."""
    config = Path(source) / "config.json"
    if config.is_file():
        text = json.dumps(json.loads(config.read_text()), sort_keys=True)
        return "config:" + hashlib.sha256(text.encode()).hexdigest()
    return f"hub:{source}@{revision or 'main'}"


def key_inputs(model: str, training, *, backend: str, padding_free: bool | None, versions: dict, gpu: dict,
               env: dict[str, str]) -> dict[str, Any]:
    """Everything that decides what gets compiled (training: a TrainingSpec with auto values resolved)."""
    lora = training.lora
    return {
        "model": model, "backend": backend, "method": training.method, "maxSeqLength": training.max_seq_length,
        "batchSize": training.batch_size, "packing": training.packing, "paddingFree": padding_free,
        "gradientCheckpointing": training.gradient_checkpointing,
        "lora": {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "targets": sorted(lora.target_modules)},
        "versions": versions, "gpu": gpu,
        "env": {k: v for k, v in sorted(env.items()) if k.startswith(("UNSLOTH_", "TORCHINDUCTOR_", "TRITON_"))
                and k not in ENV_DIRS.values() and k != "UNSLOTH_DISABLE_STATISTICS"},
    }


def switches(defaults: dict[str, str] | None = None) -> dict[str, str]:
    """The switches a run was started with (finetune_trainer.STARTUP_ENV), over the trainer's own defaults.

    Not os.environ at the time the key is taken: by then it also holds what the libraries imported since
    set in-process, and on the GPU a re-run's key differed from its first run's that way (the seed
    bench's run 2 missed, 2026-12-05). What libraries set follows from their versions, already keyed.
    """
    from .. import STARTUP_ENV

    return {**(defaults or {}), **STARTUP_ENV}


def archive(dirs: dict[str, Path], out: Path) -> Path:
    """One uncompressed tar (kernels compress poorly and S3 is near): <name>/<files> for each cache."""
    tmp = out.with_name(out.name + ".part")
    with tarfile.open(tmp, "w") as tar:
        for name, path in sorted(dirs.items()):
            if path.is_dir():
                tar.add(str(path), arcname=name, recursive=True)
    tmp.replace(out)
    return out


RESTORING = ".restoring"


def extract(tar_file: Path, dirs: dict[str, Path]) -> None:
    """Unpacks each cache's files into its directory; tarfile's data filter refuses paths that leave it.

    Each file lands beside its place and is renamed over it, never written into: the process has already
    loaded some of these files by now (the imports built Triton's driver stubs into its cache and mapped
    them), and a file truncated and rewritten under a mapping crashes the process when it next runs code
    from it. A rename leaves the mapped file's inode as it was.
    """
    with tarfile.open(tar_file) as tar:
        for member in tar.getmembers():
            top, _, rest = member.name.partition("/")
            if top not in dirs or not rest or not member.isfile():  # folders come with their files
                continue
            member.name = rest
            staging = dirs[top] / RESTORING
            tar.extract(member, str(staging), filter="data")
            target = dirs[top] / rest
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rest, target)
    for path in dirs.values():
        shutil.rmtree(path / RESTORING, ignore_errors=True)


def file_count(dirs: dict[str, Path]) -> int:
    return sum(1 for path in dirs.values() if path.is_dir() for p in path.rglob("*") if p.is_file())


def save_artifacts(dirs: dict[str, Path]) -> int:
    """Writes what torch.compile made in this process into the artifacts folder; its size (0: nothing).

    Call it from the training thread, between steps and export: it serializes what torch recorded while
    compiling, which must not run beside a compilation."""
    import torch

    try:
        saved = torch.compiler.save_cache_artifacts()
    except Exception as exc:  # noqa: BLE001 - a cache must never fail the run
        log.warning("compile cache: torch could not serialize its artifacts (%s: %s)", type(exc).__name__, exc)
        return 0
    if not saved or not saved[0]:
        return 0
    out = dirs[ARTIFACTS_DIR] / ARTIFACTS
    tmp = out.with_name(out.name + ".part")
    tmp.write_bytes(saved[0])
    tmp.replace(out)
    return len(saved[0])


def load_artifacts(dirs: dict[str, Path]) -> str:
    """Hands a restored archive's torch.compile artifacts to torch before anything compiles: "loaded",
    "absent", or why torch refused them (the run then compiles, as on a miss)."""
    path = dirs[ARTIFACTS_DIR] / ARTIFACTS
    if not path.is_file():
        return "absent"
    import torch

    try:
        return "loaded" if torch.compiler.load_cache_artifacts(path.read_bytes()) is not None else "refused"
    except Exception as exc:  # noqa: BLE001 - a cache must never fail the run
        log.warning("compile cache: torch refused the restored artifacts (%s: %s)", type(exc).__name__, exc)
        return f"refused: {type(exc).__name__}"


class CompileCache:
    """Restore before the model loads; save (in the background) after a run that missed."""

    def __init__(self, cache: S3Cache, dirs: dict[str, Path], inputs: dict[str, Any], scratch: Path):
        from ..storage.cache import digest

        self.cache = cache
        self.dirs = dirs
        self.inputs = inputs
        self.key = digest(inputs)
        self.scratch = scratch
        self.lookup: Lookup | None = None
        self._thread: threading.Thread | None = None
        self.stored: bool | None = None
        self.artifacts: str | None = None  # load_artifacts' answer on a hit

    def restore(self) -> Lookup:
        staging = self.scratch / "compile-cache-fetch"
        self.lookup = self.cache.fetch(self.key, staging)
        if self.lookup.hit:
            try:
                extract(staging / ARCHIVE, self.dirs)
            except (tarfile.TarError, OSError) as exc:
                self.lookup = Lookup(False, f"corrupt: {exc}", self.lookup.seconds)
        shutil.rmtree(staging, ignore_errors=True)
        return self.lookup

    def save(self) -> bool:
        """Archives and uploads the caches (on a miss only: a hit's caches are what S3 has already)."""
        if self.lookup is not None and self.lookup.hit:
            return False
        if file_count(self.dirs) == 0:
            return False
        t0 = time.monotonic()
        out = self.scratch / "compile-cache-store"
        out.mkdir(parents=True, exist_ok=True)
        archive(self.dirs, out / ARCHIVE)
        self.stored = self.cache.store_entry(self.key, out, [ARCHIVE], self.inputs)
        (out / ARCHIVE).unlink(missing_ok=True)
        log.info("compile cache: archived in %.1fs", time.monotonic() - t0)
        return self.stored

    def save_in_background(self) -> None:
        self._thread = threading.Thread(target=self.save, name="compile-cache-save", daemon=True)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def report(self) -> dict[str, Any]:
        lookup = self.lookup or Lookup(False, "not looked up")
        return {"compile": lookup.label, "compileReason": lookup.reason, "compileKey": self.key[:16],
                **({"compileStored": self.stored} if self.stored is not None else {}),
                **({"compileArtifacts": self.artifacts} if self.artifacts is not None else {})}
