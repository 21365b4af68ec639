"""Progress and metrics: one Reporter that every stage talks to, and small sinks behind it.

- metric loggers (torchtune style) get every training step: JSON Lines on disk, for the loss curve;
- the log gets a tqdm bar while training and one line per report;
- the FinetuneJob status gets a patch at most every FINETUNE_PROGRESS_INTERVAL seconds (default 5),
  at every stage change, and at the end with the final metrics and artifacts; in a pod the patches
  go out from their own thread (kube_status.BackgroundPatcher), so the apiserver never stalls a step.
A failing sink is logged and skipped: reporting never stops training.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from finetune_api import contract
from finetune_api.status import Artifact, Progress, now_rfc3339

from ..errors import TransientError

log = logging.getLogger("finetune")


class MetricLogger(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...


class JsonlLogger:
    """Appends one JSON object per step; survives restarts (resumed steps continue the file)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


class Reporter:
    def __init__(self, run: int | None = None, patcher=None, interval: float | None = None,
                 metric_loggers: list[MetricLogger] | None = None, clock=time.monotonic):
        self.run = run
        self.patcher = patcher
        self.interval = interval if interval is not None else float(os.environ.get(contract.ENV_PROGRESS_INTERVAL, 5))
        self.metric_loggers = list(metric_loggers or [])
        self.clock = clock
        self.progress = Progress(run=run)
        self._last_sent = float("-inf")
        self._bar = None
        self._losses: list[float] = []  # since the last report, for a smoothed loss

    @classmethod
    def from_env(cls, run: int | None = None, **kw) -> Reporter:
        from .kube_status import BackgroundPatcher, StatusPatcher

        patcher = StatusPatcher.from_env()
        return cls(run=patcher.run if patcher else run, patcher=BackgroundPatcher(patcher) if patcher else None, **kw)

    # --- what stages call ----------------------------------------------------------------------
    def stage(self, stage: str, message: str | None = None) -> None:
        self._close_bar()
        self.progress = self.progress.model_copy(update={"stage": stage, "message": message or f"{stage}"})
        log.info("== stage %s%s", stage, f": {message}" if message else "")
        self._send(force=True)

    def message(self, text: str) -> None:
        self.progress = self.progress.model_copy(update={"message": text})
        log.info("%s", text)
        self._send()

    def work(self, text: str, percent: float | None = None, eta_seconds: int | None = None) -> None:
        """Progress of a stage counted in work items (evaluation requests): message, percent and ETA."""
        update: dict[str, Any] = {"message": text}
        if percent is not None:
            update["percent"] = int(percent)
        if eta_seconds is not None:
            update["eta_seconds"] = int(eta_seconds)
        self.progress = self.progress.model_copy(update=update)
        log.info("%s", text)
        self._send(force=percent == 100)

    def train_step(self, step: int, total_steps: int, metrics: dict[str, Any]) -> None:
        """Called after every optimizer step with loss, learningRate, tokensPerSecond, epoch, etaSeconds,
        and evalLoss on the steps that evaluated (training.evalEverySteps)."""
        for logger in self.metric_loggers:
            try:
                logger.log(step, metrics)
            except OSError as exc:
                log.warning("metric logger %s failed: %s", type(logger).__name__, exc)
        self._losses.append(float(metrics["loss"]))
        self._update_bar(step, total_steps, metrics)
        evaluated = metrics.get("evalLoss") is not None
        if evaluated:
            self._set_eval(step, metrics["evalLoss"])
        self.progress = self.progress.model_copy(update={
            "step": step, "total_steps": total_steps, "epoch": round(float(metrics.get("epoch", 0)), 4),
            "percent": int(100 * step / max(total_steps, 1)),
            "loss": round(sum(self._losses) / len(self._losses), 5),
            "learning_rate": float(metrics.get("learningRate", 0.0)),
            "tokens_per_second": round(float(metrics.get("tokensPerSecond", 0.0)), 1),
            "eta_seconds": int(metrics.get("etaSeconds", 0)),
            "message": f"step {step}/{total_steps}",
        })
        # A new eval loss is always sent (a sweep's median rule compares trials at their eval steps); in a pod
        # a newer patch may overtake it only before it left, and that one carries it too (the latest eval).
        if self._send(force=step == total_steps or evaluated):
            self._losses.clear()

    def eval_loss(self, step: int, loss: float | None) -> None:
        """The validation loss after training (the periodic ones come with train_step): sent at once."""
        if loss is None:
            return
        self._set_eval(step, loss)
        self._send(force=True)

    def _set_eval(self, step: int, loss: float) -> None:
        self.progress = self.progress.model_copy(update={"eval_loss": round(float(loss), 5), "eval_step": step})
        log.info("validation loss %.5f at step %d", loss, step)

    def start_training(self, step: int, total_steps: int, restarts: int, last_loss: float | None = None) -> None:
        """Where training starts: step 0, or the resumed checkpoint's step, so a status read after a resume
        that found every step done (a pod killed after the last checkpoint) still says how far it got."""
        update: dict[str, Any] = {"restarts": restarts, "step": step, "total_steps": total_steps,
                                  "percent": int(100 * step / max(total_steps, 1))}
        if last_loss is not None:
            update["loss"] = round(float(last_loss), 5)
        self.progress = self.progress.model_copy(update=update)

    def finish(self, metrics: dict[str, Any], artifacts: list[Artifact], attempts: int = 4) -> None:
        """The completion report: the operator calls a run Succeeded only once it holds these artifacts,
        so a report that cannot be delivered fails the attempt (the Job retries; every stage is done)."""
        self._close_bar()
        self.progress = self.progress.model_copy(update={"message": "done", "percent": 100,
                                                         "updated_at": now_rfc3339()})
        if self.patcher is None:
            return
        # A background patcher's send() delivers on this thread, after what was queued before it.
        deliver = getattr(self.patcher, "send", self.patcher.patch)
        for attempt in range(attempts):
            if deliver(progress=self.progress.wire(), metrics=metrics, artifacts=[a.wire() for a in artifacts]):
                return
            if not self.patcher.enabled:  # a newer run owns the status, or the object is gone
                return
            time.sleep(min(2.0 ** attempt, 10.0))
        raise TransientError("StatusReportFailed", "could not write the completion report into the "
                             "FinetuneJob's status; the artifacts are uploaded and the retry will report them")

    def close(self, timeout: float = 15.0) -> None:
        """Delivers the progress still waiting to be sent (a failing run's last stage and message)."""
        self._close_bar()
        close = getattr(self.patcher, "close", None)
        if close is not None:
            close(timeout)

    # --- sinks ---------------------------------------------------------------------------------
    def _send(self, force: bool = False, **final: Any) -> bool:
        now = self.clock()
        if not force and now - self._last_sent < self.interval:
            return False
        self._last_sent = now
        self.progress = self.progress.model_copy(update={"updated_at": now_rfc3339()})
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss={self.progress.loss} lr={self.progress.learning_rate:.2e}")
        if self.patcher is not None:
            self.patcher.patch(progress=self.progress.wire(), **final)
        return True

    def _update_bar(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        if self._bar is None:
            from tqdm import tqdm

            # mininterval keeps pod logs readable; tqdm writes a new line when stderr is not a TTY.
            self._bar = tqdm(total=total, initial=step - 1, desc="training", unit="step", file=sys.stderr,
                             mininterval=self.interval, dynamic_ncols=True)
        self._bar.update(step - self._bar.n)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
