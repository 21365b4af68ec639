"""Resumable checkpoints, on local disk and in S3 (`<output_uri>checkpoints/step-XXXXXXXX/`).

A checkpoint is the LoRA adapter, optimizer and scheduler state, RNG states and state.json. state.json
is written (and uploaded) last: a checkpoint without it is incomplete and ignored. Resuming takes the
newest complete checkpoint wherever it is, so a pod that lost its disk continues from S3.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune_api.status import Reason

from ..errors import ConfigError

log = logging.getLogger(__name__)
STATE = "state.json"
NAME = re.compile(r"^step-(\d{8})$")
KEEP_LOCAL = 2  # older local checkpoints are deleted; S3 keeps them all


def _name(step: int) -> str:
    return f"step-{step:08d}"


class Checkpoints:
    def __init__(self, local_dir: Path, remote_uri: str | None = None, store=None):
        self.local_dir = local_dir
        self.remote_uri = remote_uri.rstrip("/") + "/" if remote_uri else None
        self.store = store if remote_uri else None
        self._upload: threading.Thread | None = None
        self._upload_error: BaseException | None = None

    # --- save ----------------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, scheduler, state: dict[str, Any], background: bool = False) -> Path:
        """Writes the checkpoint locally, then to S3 (state.json last); background: the upload runs in
        a thread (wait() joins it), so the caller goes on to export while it uploads."""
        self.wait()
        final = self.local_dir / _name(step)
        tmp = self.local_dir / f".{_name(step)}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(str(tmp / "adapter"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / STATE).write_text(json.dumps({"step": step, **state}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if self.store is not None and background:
            self._upload = threading.Thread(target=self._upload_in_thread, args=(step, final), daemon=True,
                                            name=f"checkpoint-upload-{step}")
            self._upload.start()
        elif self.store is not None:
            self._upload_files(step, final)
        self._prune()
        log.info("checkpoint: step %d saved%s", step, f" (and to {self.remote_uri})" if self.store else "")
        return final

    def _upload_files(self, step: int, final: Path) -> None:
        uri = f"{self.remote_uri}{_name(step)}/"
        files = sorted(p for p in final.rglob("*") if p.is_file())
        for p in sorted(files, key=lambda p: p.name == STATE):  # state.json last
            self.store.upload_file(p, uri + p.relative_to(final).as_posix())

    def _upload_in_thread(self, step: int, final: Path) -> None:
        try:
            self._upload_files(step, final)
        except BaseException as exc:  # noqa: BLE001 - raised again by wait(), on the caller's thread
            self._upload_error = exc

    def wait(self) -> None:
        """Joins a background upload; its failure is raised here."""
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._upload_error is not None:
            err, self._upload_error = self._upload_error, None
            raise err

    def _prune(self) -> None:
        for old in self._local_steps()[:-KEEP_LOCAL]:
            shutil.rmtree(self.local_dir / _name(old), ignore_errors=True)

    # --- find and load -------------------------------------------------------------------------
    def _local_steps(self) -> list[int]:
        if not self.local_dir.exists():
            return []
        return sorted(int(m.group(1)) for p in self.local_dir.iterdir()
                      if (m := NAME.match(p.name)) and (p / STATE).exists())

    def _remote_steps(self) -> list[int]:
        if self.store is None:
            return []
        steps = set()
        for key in self.store.list_keys(self.remote_uri):
            parts = key.split("/")
            if len(parts) >= 2 and parts[-1] == STATE and (m := NAME.match(parts[-2])):
                steps.add(int(m.group(1)))
        return sorted(steps)

    def newest(self) -> Path | None:
        """The newest complete checkpoint, downloaded from S3 when S3 has a newer one."""
        local, remote = self._local_steps(), self._remote_steps()
        best_local, best_remote = (local[-1] if local else -1), (remote[-1] if remote else -1)
        if best_remote > best_local:
            dest = self.local_dir / _name(best_remote)
            shutil.rmtree(dest, ignore_errors=True)
            self.store.download_prefix(f"{self.remote_uri}{_name(best_remote)}/", dest)
            log.info("checkpoint: step %d fetched from %s", best_remote, self.remote_uri)
            return dest
        return self.local_dir / _name(best_local) if best_local >= 0 else None

    @staticmethod
    def load(path: Path, model, optimizer, scheduler) -> dict[str, Any]:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        adapter = load_file(str(path / "adapter" / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, adapter)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            # The same checkpoint is the newest on every retry, so a retry would fail the same way.
            raise ConfigError(Reason.CHECKPOINT_MISMATCH, f"checkpoint {path.name} does not fit the model: "
                              f"unexpected {unexpected[:3]}")
        device = next(model.parameters()).device
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
        return json.loads((path / STATE).read_text())


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
