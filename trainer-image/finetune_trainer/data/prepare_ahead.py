"""The dataset prepared in a child process while the training process makes its GPU imports.

`import unsloth` (with torch, transformers and their patches) takes a large share of a short run's
time before anything else can happen in that process; encoding the dataset needs none of it. So
`finetune run` starts `finetune prepare-dataset` for the same config and workdir first (the same stage
function, its outputs and done-marker in the same workdir, the same dataset cache), imports, and
then only waits for what is left of it. The child never reports to the status (the training process
alone does, from the stage on) and its log is replayed into the training process's log when it ends.
Whatever goes wrong in the child, the stage runs again in the training process, which then fails (or
not) with its own typed error.

Light on purpose: imported before torch. FINETUNE_PREPARE_AHEAD: "auto" (the default: when Unsloth is
about to be imported), "on" or "off".
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_api import contract

log = logging.getLogger(__name__)
ENV = "FINETUNE_PREPARE_AHEAD"
LOG_NAME = "prepare-ahead.log"


@dataclass
class Ahead:
    proc: subprocess.Popen
    log_file: Path

    def join(self, dataset_dir: Path) -> dict[str, Any] | None:
        """The child's report once it has finished, or None when the stage must run here after all."""
        rc = self.proc.wait()
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        if text:
            sys.stderr.write(text if text.endswith("\n") else text + "\n")  # into the pod's log, in order
        report = dataset_dir / "report.json"
        if rc != 0 or not report.exists():
            log.warning("preparing the dataset ahead failed (exit %s): preparing it here", rc)
            return None
        return json.loads(report.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wanted(heavy_imports: bool) -> bool:
    choice = os.environ.get(ENV, "auto").lower()
    return choice in ("on", "1", "true") or (choice == "auto" and heavy_imports)


def start(config: str | None, workdir: Path, resume: bool, base_uri: str | None) -> Ahead | None:
    """`finetune prepare-dataset` for this run, in the background; None where it cannot run apart.

    Not under torchrun (one process per pod prepares already) nor for a base model that must first be
    downloaded or dequantized into the workdir (one process makes that folder)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or (base_uri or "").startswith("s3://") \
            or (base_uri or "").endswith(".gguf"):
        return None
    config = config or os.environ.get(contract.ENV_CONFIG)
    if not config:
        return None
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = workdir / LOG_NAME
    env = {k: v for k, v in os.environ.items() if k not in (contract.ENV_JOB_NAME, contract.ENV_JOB_NAMESPACE,
                                                           contract.ENV_RUN)}  # the child never reports
    env[ENV] = "off"
    cmd = [sys.executable, "-m", "finetune_trainer", "prepare-dataset", "--ahead", "--config", config,
           "--workdir", str(workdir),
           *(["--resume"] if resume else [])]
    with open(log_file, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    log.info("preparing the dataset in a child process (pid %d) while the training libraries load", proc.pid)
    return Ahead(proc, log_file)
