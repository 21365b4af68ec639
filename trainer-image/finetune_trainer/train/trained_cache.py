"""The training cache: a run whose training inputs match an earlier run's reuses that run's adapter.

The user's loop is fine-tune → export → evaluate → adjust → re-run, and most re-runs change only what
happens after training: another quantization, an evaluation, a Modelfile. Those runs skip training
(and its GPU minutes) and start at the export with the adapter the earlier run trained.

An entry (cache.py's layout, kind "trained") holds the adapter folder, train_result.json, the training
log and loss plot, and origin.json (the run that trained it). Its key is the digest of everything that
decides the adapter: the base model's weights, the prepared dataset's files, the training spec, the
library versions, the trainer's training code, the device and the process count. Change any of them
(the seed too) and the run trains. `FINETUNE_CACHE=off` turns every cache off.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from ..paths import Workdir
from ..storage.cache import Lookup, S3Cache, digest, sha256_files

log = logging.getLogger(__name__)

# The code whose output an adapter is: a change to any of these files makes new keys.
CODE_FILES = ("recipe.py", "batching.py", "varlen_attention.py", "model_loading.py", "auto_batch.py")
ORIGIN = "origin.json"
RESULT = "train_result.json"
# Training fields that do not change the adapter: how often it checkpoints, how often it reports the
# validation loss (evaluation runs in eval mode and draws no random numbers).
NOT_IN_KEY = ("checkpoint_every_steps", "eval_every_steps")


def code_version() -> str:
    here = Path(__file__).resolve().parent
    return sha256_files([here / name for name in CODE_FILES if (here / name).is_file()])[:16]


def weights_identity(source: str, revision: str | None) -> str | None:
    """The base model's files' digest where it is a folder (weights, config, tokenizer), its Hub name at a
    pinned commit, or None for a Hub name whose revision can move (a branch or tag): no reuse then."""
    folder = Path(source)
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        return "files:" + sha256_files(files, folder)
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return f"hub:{source}@{revision}"
    return None


def key_inputs(*, model: str, dataset_dir: Path, training, versions: dict, device: dict, world_size: int,
               backend: str) -> dict[str, Any]:
    """Everything that decides the adapter (training: the spec's TrainingSpec, auto values unresolved:
    auto decides the same way for the same model, device and process count, which are in the key)."""
    prepared = sorted(p for p in dataset_dir.glob("*.parquet"))
    fields = {k: v for k, v in training.model_dump(mode="json").items() if k not in NOT_IN_KEY}
    return {"model": model, "dataset": sha256_files(prepared, dataset_dir), "training": fields,
            "versions": versions, "code": code_version(), "device": device, "worldSize": world_size,
            "backend": backend}


def entry_files(wd: Workdir) -> list[str]:
    """What an entry holds, relative to the workdir (the adapter folder's files, log and plot)."""
    files = [p.relative_to(wd.root).as_posix() for p in sorted(wd.adapter.rglob("*")) if p.is_file()]
    files += [p.name for p in (wd.train_log, wd.loss_plot) if p.is_file()]
    return files


ORIGIN_FIELDS = {"namespace": str, "name": str, "uid": str, "run": int, "outputUri": str}


def origin_fields(text: str) -> dict[str, Any]:
    """The run an entry names as its maker, as it goes into the status: only the known fields, of their
    types, strings bounded. Whoever can write the bucket can write this file; it never shapes the status."""
    try:
        raw = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(raw, dict):
        return {}
    return {k: v[:512] if isinstance(v, str) else v for k, kind in ORIGIN_FIELDS.items()
            if k in raw and ((v := raw[k]) is None or isinstance(v, kind) and not isinstance(v, bool))}


class TrainedCache:
    """Lookup before training, store after it, for one run's workdir."""

    def __init__(self, cache: S3Cache, wd: Workdir, inputs: dict[str, Any], run: tuple | None = None):
        self.cache, self.wd, self.inputs = cache, wd, inputs
        self.run = run  # (uid, run number) of the run looking: its own entry is not a reuse
        self.key = digest(inputs)
        self.lookup: Lookup | None = None
        self.origin: dict[str, Any] | None = None
        self.stored: bool | None = None

    def restore(self) -> Lookup:
        """On a hit the workdir holds the earlier run's adapter, result, log and plot (and origin.json)."""
        staging = self.wd.root / ".trained-cached"
        lookup = self.cache.fetch(self.key, staging)
        if lookup.hit and not (staging / "adapter" / RESULT).is_file():
            lookup = Lookup(False, "corrupt: the entry has no train_result.json", lookup.seconds)
        allowed = {self.wd.adapter.name, self.wd.train_log.name, self.wd.loss_plot.name, ORIGIN}
        stray = sorted(p.name for p in staging.iterdir() if p.name not in allowed) if lookup.hit else []
        if stray:  # an entry writes only the adapter, its log, plot and origin, never the rest of the workdir
            lookup = Lookup(False, f"corrupt: the entry holds {stray[0]!r}", lookup.seconds)
        origin = origin_fields((staging / ORIGIN).read_text()) if lookup.hit and (staging / ORIGIN).is_file() else {}
        if lookup.hit and self.run is not None and (origin.get("uid"), origin.get("run")) == self.run:
            # A retry of the run that stored it (its pod died after training): it resumes from its own
            # checkpoints, so its restarts and resume are counted as for any retry.
            lookup = Lookup(False, "own: this run stored it; a retry resumes from its checkpoints", lookup.seconds)
        if lookup.hit:
            shutil.rmtree(self.wd.adapter, ignore_errors=True)
            for path in sorted(staging.iterdir()):
                shutil.move(str(path), str(self.wd.root / path.name))
            self.origin = origin
        shutil.rmtree(staging, ignore_errors=True)
        self.lookup = lookup
        return lookup

    def store(self, origin: dict[str, Any]) -> bool:
        """After a run trained: its adapter, for the next run with the same inputs."""
        (self.wd.root / ORIGIN).write_text(json.dumps(origin, sort_keys=True))
        self.stored = self.cache.store_entry(self.key, self.wd.root, [*entry_files(self.wd), ORIGIN], self.inputs)
        return self.stored

    def report(self) -> dict[str, Any]:
        """For status.metrics.cache: hit or miss, why, the key, and on a hit the run that trained it."""
        lookup = self.lookup or Lookup(False, "not looked up")
        out: dict[str, Any] = {"training": lookup.label, "trainingReason": lookup.reason,
                               "trainingKey": self.key[:16]}
        if self.origin:
            out["trainedBy"] = self.origin
        if self.stored is not None:
            out["trainingStored"] = self.stored
        return out
