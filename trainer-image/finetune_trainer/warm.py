"""The warm trainer: `finetune run --keep-warm SECONDS` stays after its run for the next one.

A re-run after a spec edit (4 epochs instead of 2, a lower learning rate) in a new pod pays the imports
(~11 s of `import unsloth`), the model load (~5 s) and the first step's compile again before its first
step. A trainer that keeps its process pays none of them: the next run is handed to it, and it runs in
the same process with the model it kept (train/model_pool.py: its adapter reset to the load's values, so
the run trains as a cold one would) and the kernels it compiled.

Who hands runs over (finetune_api.contract says the protocol):
- in a pod, the operator, through the FinetuneJob's status (`KubeHandoffs`): the trainer advertises
  `status.warm`, takes `status.handoff`, and leaves with a patch that fails once a handoff has landed;
- by hand or from a script, a folder (`--handoff-dir`, `DirHandoffs`): the next run's config written as
  `next.yaml` is taken (renamed), and `warm.json` says who waits and until when.

A handed-over config is trusted only as far as its channel: it must hash to the digest that came with it,
name this FinetuneJob (namespace, name, uid) and a later run, and keep the egress rule the pod was started
with. Otherwise the run is refused (`HandoffRefused`). A run that fails here fails the pod for good
(EXIT_CONFIG_ERROR): the Job's retry would start the pod template's first run again, not this one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import yaml

from finetune_api import GROUP, PLURAL, VERSION, RunConfig, contract
from finetune_api.status import RFC3339, Reason

from .errors import ConfigError, TrainerError

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0
REFUSED = "HandoffRefused"
WARM_DIR = "warm"  # <workdir>/warm/run-N: a handed-over run's own workdir


class Handoffs(Protocol):
    def advertise(self, run: int, until: datetime) -> None: ...

    def poll(self, run: int) -> tuple[str, str] | None:
        """(config text, its SHA-256 as handed over) of a run later than `run`, taken; or None."""

    def leave(self, run: int) -> tuple[str, str] | None:
        """Stops advertising; a handoff that landed first is returned (and taken) instead."""


def until_after(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


class DirHandoffs:
    """A folder as the channel: whoever can write it can hand this process a run (a person, a bench)."""

    NEXT, WARM = "next.yaml", "warm.json"

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def advertise(self, run: int, until: datetime) -> None:
        (self.folder / self.WARM).write_text(json.dumps({
            contract.WARM_RUN: run, contract.WARM_POD: f"pid {os.getpid()}", contract.WARM_UNTIL: until.strftime(RFC3339)}))

    def poll(self, run: int) -> tuple[str, str] | None:
        nxt = self.folder / self.NEXT
        if not nxt.is_file():
            return None
        taken = self.folder / f"taken-after-run-{run}.yaml"
        nxt.replace(taken)  # atomic: a config written after this is the next one's
        text = taken.read_text()
        return text, hashlib.sha256(text.encode()).hexdigest()

    def leave(self, run: int) -> tuple[str, str] | None:
        (self.folder / self.WARM).unlink(missing_ok=True)
        return self.poll(run)


class KubeHandoffs:
    """The FinetuneJob's status as the channel (its Role lets this pod get the object and patch its status)."""

    def __init__(self, api, namespace: str, name: str, pod: str | None):
        self.api, self.namespace, self.name, self.pod = api, namespace, name, pod

    @classmethod
    def from_env(cls) -> KubeHandoffs | None:
        from .reporting.kube_status import StatusPatcher

        patcher = StatusPatcher.from_env()
        if patcher is None:
            return None
        return cls(patcher.api, patcher.namespace, patcher.name, os.environ.get(contract.ENV_POD_NAME))

    def _patch(self, body: list[dict[str, Any]]) -> bool:
        """False when a test op failed (HTTP 422): the status moved on."""
        from kubernetes.client.exceptions import ApiException

        from .reporting.kube_status import JSON_PATCH

        try:
            self.api.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, PLURAL, self.name, body,
                                                            _content_type=JSON_PATCH, _request_timeout=10)
            return True
        except ApiException as exc:
            if exc.status in (409, 422):
                return False
            raise

    def advertise(self, run: int, until: datetime) -> None:
        warm = {contract.WARM_RUN: run, contract.WARM_POD: self.pod or "", contract.WARM_UNTIL: until.strftime(RFC3339)}
        if not self._patch(contract.progress_patch(run, warm=warm)):
            log.warning("warm trainer: the status already belongs to a later run")

    def poll(self, run: int) -> tuple[str, str] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj = self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name,
                                                        _request_timeout=10)
        except ApiException as exc:
            if exc.status == 404:
                raise ConfigError("JobDeleted", f"FinetuneJob {self.namespace}/{self.name} is gone") from exc
            log.warning("warm trainer: reading the FinetuneJob failed: HTTP %s", exc.status)
            return None
        except Exception as exc:  # noqa: BLE001 - the apiserver away for a moment: poll again
            log.warning("warm trainer: reading the FinetuneJob failed: %s", exc)
            return None
        status = obj.get("status") or {}
        handoff = status.get("handoff") or {}
        new_run = handoff.get(contract.HANDOFF_RUN)
        if not isinstance(new_run, int) or new_run <= run or status.get("run") != new_run:
            return None
        self._patch(contract.take_handoff_patch(new_run))  # the config leaves the status (best effort)
        return str(handoff.get(contract.HANDOFF_CONFIG) or ""), str(handoff.get(contract.HANDOFF_CONFIG_SHA256) or "")

    def leave(self, run: int) -> tuple[str, str] | None:
        if self._patch(contract.leave_warm_patch(run)):
            return None
        # The test failed: the operator handed a run over first (or took the status for a new Job).
        return self.poll(run)


def accept(text: str, digest: str, current: RunConfig, first: RunConfig) -> RunConfig:
    """The handed-over config, checked (module docstring); ConfigError(HandoffRefused) otherwise."""
    actual = hashlib.sha256(text.encode()).hexdigest()
    if actual != digest.strip().lower():
        raise ConfigError(REFUSED, f"the handed-over run config hashes to {actual[:16]}…, not the {digest[:16]}… "
                                   "it came with")
    try:
        cfg = RunConfig.model_validate(yaml.safe_load(text))
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, the run is refused
        raise ConfigError(REFUSED, f"the handed-over run config does not parse: {exc}"[:500]) from exc
    mine = current.job
    if (cfg.job.namespace, cfg.job.name, cfg.job.uid) != (mine.namespace, mine.name, mine.uid):
        raise ConfigError(REFUSED, f"the handed-over run config is for {cfg.job.namespace}/{cfg.job.name}, "
                                   f"not {mine.namespace}/{mine.name} (uid {mine.uid})")
    if cfg.job.run <= mine.run:
        raise ConfigError(REFUSED, f"the handed-over run {cfg.job.run} is not after run {mine.run}")
    if cfg.egress != first.egress:
        raise ConfigError(REFUSED, "the handed-over run config has another egress rule than the one this pod "
                                   "was started with; a new pod must run it")
    return cfg


class Serving:
    """Whether a handed-over run is in progress: its failure must not be retried (cli.main asks)."""

    handed_run: int | None = None


def serve(first: RunConfig, workdir: Path, seconds: float, handoffs: Handoffs, run_fn, pool) -> int:
    """Waits up to `seconds` after each run for the next; runs each in this process. Returns the runs
    taken. run_fn(cfg, workdir, reporter=..., pool=...) is pipeline.run."""
    from .reporting.progress import Reporter

    current, taken = first, 0
    while True:
        handoffs.advertise(current.job.run, until_after(seconds))
        log.info("warm trainer: run %d done; waiting up to %.0f s for the next run", current.job.run, seconds)
        try:
            got = _wait(handoffs, current.job.run, seconds)
        except TrainerError as exc:
            if exc.reason != Reason.TERMINATED:
                raise
            # Stopped while idle (the Job deleted, the node drained): the run it finished stands.
            log.info("warm trainer: %s while waiting; leaving", exc.message.split(" ")[0])
            handoffs.leave(current.job.run)
            return taken
        if got is None:
            log.info("warm trainer: no run was handed over in %.0f s; leaving", seconds)
            return taken
        Serving.handed_run = None
        try:
            nxt = accept(*got, current, first)
        except TrainerError:
            Serving.handed_run = current.job.run + 1  # refused: the operator's run fails, not retried
            raise
        Serving.handed_run = nxt.job.run
        log.info("warm trainer: took run %d", nxt.job.run)
        clear_earlier_runs(workdir)  # in S3 already; a pod's disk would fill up run after run
        reporter = _reporter(nxt.job.run, Reporter)
        run_fn(nxt, workdir / WARM_DIR / f"run-{nxt.job.run}", reporter=reporter, pool=pool)
        Serving.handed_run = None
        current, taken = nxt, taken + 1


def clear_earlier_runs(workdir: Path) -> None:
    """Removes the folders earlier runs left in the workdir (the first run's at its root, later ones'
    under warm/): their files are in S3, and a warm pod's disk would fill up run after run. Their small
    files (metrics.json, the training log) stay."""
    import shutil

    runs = [workdir, *((workdir / WARM_DIR).iterdir() if (workdir / WARM_DIR).is_dir() else ())]
    for run in runs:
        for entry in run.iterdir() if run.is_dir() else ():
            if entry.is_dir() and not entry.is_symlink() and entry.name != WARM_DIR:
                shutil.rmtree(entry, ignore_errors=True)


def _wait(handoffs: Handoffs, run: int, seconds: float) -> tuple[str, str] | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (got := handoffs.poll(run)) is not None:
            return got
        time.sleep(POLL_SECONDS)
    return handoffs.leave(run)


def _reporter(run: int, reporter_cls):
    """A reporter for the handed-over run (the pod's environment names the run it started with)."""
    from .reporting.kube_status import BackgroundPatcher, StatusPatcher

    patcher = StatusPatcher.from_env(run=run)
    return reporter_cls(run=run, patcher=BackgroundPatcher(patcher) if patcher else None)
