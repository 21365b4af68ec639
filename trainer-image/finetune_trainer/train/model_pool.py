"""The model a warm trainer keeps between runs (`finetune run --keep-warm`, warm.py).

A re-run after a spec edit that changes only what the model load does not read (epochs, learning rate,
batch size, schedule...) trains the same base weights with the same fresh LoRA adapter. Loading them again
costs ~5 s (Unsloth's patching) and their graphs compile again. Kept in the process instead, the model
is handed back with its adapter set to the exact values the load gave it (a snapshot taken right after
the load), so a warm run trains from the same start as a cold one: same weights, same seed, same result.

The key is everything the load reads. A run whose key differs loads afresh (and the old model is dropped
first, so two never share the GPU).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_api.spec import TrainingSpec

log = logging.getLogger(__name__)


def files_stamp(source: str) -> list | None:
    """Name, size and mtime of each file of a local model folder: weights replaced in place at the same
    path (a volume updated between runs) are not the weights the process holds."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    return [(p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()]


def load_key(base, training: TrainingSpec, backend: str) -> str:
    """What the model load and its adapter's initialisation read, as a string (equal keys, same model)."""
    lora = training.lora
    return json.dumps({
        "source": str(base.source), "revision": base.revision, "files": files_stamp(base.source),
        "backend": backend, "method": training.method,
        "maxSeqLength": training.max_seq_length, "gradientCheckpointing": training.gradient_checkpointing,
        "seed": training.seed, "paddingFree": training.padding_free,
        "lora": {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
                 "targets": sorted(lora.target_modules)},
    }, sort_keys=True)


@dataclass
class Held:
    key: str
    model: Any
    backend: str
    padding_free: bool  # what varlen_attention.enable answered for it (it patches the model once)
    initial: dict[str, Any]  # every trainable parameter's value right after the load


class ModelPool:
    """At most one model, kept by a warm trainer for its next run."""

    def __init__(self) -> None:
        self.held: Held | None = None
        self.reused = 0  # runs that took the kept model (status metrics say so)

    @staticmethod
    def snapshot(model) -> dict[str, Any]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def take(self, key: str) -> Held | None:
        """The kept model with its adapter as loaded, if it was loaded for `key`; else None (and the
        kept one, of another key, is let go so the caller's load has the memory)."""
        import torch

        held, self.held = self.held, None
        if held is None:
            return None
        if held.key != key:
            log.info("warm trainer: the kept model was loaded for other settings; loading afresh")
            del held
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None
        params = dict(held.model.named_parameters())
        with torch.no_grad():
            for name, value in held.initial.items():
                params[name].copy_(value)
                params[name].grad = None
        held.model.train()
        self.reused += 1
        return held

    def keep(self, held: Held) -> None:
        self.held = held
