"""Progress and metrics: one Reporter that every stage talks to, and the metric loggers behind it.

Every training step's metrics go through the metric-logger interface (torchtune style) to each logger:
- JsonlLogger: JSON Lines on disk, for the loss curve (training-log.jsonl, the plot);
- ProgressBar: a tqdm bar in the pod log;
- StatusLogger: the FinetuneJob's status.progress, patched at most every FINETUNE_PROGRESS_INTERVAL seconds
  (default 5), and at once at every stage change, new eval loss and the last step; in a pod the patches go
  out from their own thread (kube_status.BackgroundPatcher), so the apiserver never stalls a step.
The completion report (final metrics and artifacts) is sent in order after them. A failing logger is logged
and skipped: reporting never stops training.
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
    """torchtune's metric-logger interface: every optimizer step's metrics (loss, learningRate, gradNorm, epoch,
    tokens, tokensPerSecond, etaSeconds, totalSteps; evalLoss on the steps that evaluated) go to each logger."""

    def log(self, step: int, metrics: dict[str, Any]) -> None: ...


class JsonlLogger:
    """Appends one JSON object per step; survives restarts (resumed steps continue the file)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


class ProgressBar:
    """A metric logger for the pod log: a tqdm bar while training (a new line per update off a TTY)."""

    def __init__(self, interval: float):
        self.interval = interval
        self._bar = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self._bar is None:
            from tqdm import tqdm

            # mininterval keeps pod logs readable.
            self._bar = tqdm(total=metrics["totalSteps"], initial=step - 1, desc="training", unit="step",
                             file=sys.stderr, mininterval=self.interval, dynamic_ncols=True)
        self._bar.set_postfix_str(f"loss={metrics['loss']:.4f} lr={metrics.get('learningRate', 0.0):.2e}",
                                  refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class StatusLogger:
    """A metric logger for the FinetuneJob's status.progress: it holds the progress the stages update too, and
    sends it through the patcher at most every `interval` seconds, or at once when forced (a stage change,
    a new eval loss, the last step). In a pod the patcher is a kube_status.BackgroundPatcher: sending
    queues the patch for its own thread, so the apiserver never stalls a training step."""

    def __init__(self, run: int | None, patcher, interval: float, clock):
        self.patcher, self.interval, self.clock = patcher, interval, clock
        self.progress = Progress(run=run)
        self._last_sent = float("-inf")
        self._losses: list[float] = []  # since the last report, for a smoothed loss

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        total = int(metrics["totalSteps"])
        self._losses.append(float(metrics["loss"]))
        evaluated = metrics.get("evalLoss") is not None
        fields: dict[str, Any] = {
            "step": step, "total_steps": total, "epoch": round(float(metrics.get("epoch", 0)), 4),
            "percent": int(100 * step / max(total, 1)),
            "loss": round(sum(self._losses) / len(self._losses), 5),
            "learning_rate": float(metrics.get("learningRate", 0.0)),
            "tokens_per_second": round(float(metrics.get("tokensPerSecond", 0.0)), 1),
            "eta_seconds": int(metrics.get("etaSeconds", 0)),
            "message": f"step {step}/{total}",
        }
        if evaluated:
            fields |= self.eval_fields(step, metrics["evalLoss"])
        # A new eval loss is always sent, as a milestone (a sweep's median rule compares trials at their eval
        # steps): no later step's patch replaces it before it has gone out.
        if self.update(force=step == total or evaluated, **fields):
            self._losses.clear()

    @staticmethod
    def eval_fields(step: int, loss: float) -> dict[str, Any]:
        log.info("validation loss %.5f at step %d", loss, step)
        return {"eval_loss": round(float(loss), 5), "eval_step": step}

    def update(self, force: bool = False, send: bool = True, **fields: Any) -> bool:
        """Sets progress fields, then sends them if forced or the interval has passed; True if sent."""
        self.progress = self.progress.model_copy(update=fields)
        if not send:
            return False
        now = self.clock()
        if not force and now - self._last_sent < self.interval:
            return False
        self._last_sent = now
        self.progress = self.progress.model_copy(update={"updated_at": now_rfc3339()})
        if self.patcher is not None:
            # A forced patch is a milestone a watcher must see; a background patcher never coalesces it.
            deliver = getattr(self.patcher, "milestone", None) if force else None
            (deliver or self.patcher.patch)(progress=self.progress.wire())
        return True


class Reporter:
    """What every stage talks to: stage changes, messages, counted work (evaluation), the training steps
    (fanned out to the metric loggers: the training log, the bar, the status) and the completion report."""

    def __init__(self, run: int | None = None, patcher=None, interval: float | None = None,
                 metric_loggers: list[MetricLogger] | None = None, clock=time.monotonic):
        interval = interval if interval is not None else float(os.environ.get(contract.ENV_PROGRESS_INTERVAL, 5))
        self.metric_loggers = list(metric_loggers or [])  # the run adds its training log (JsonlLogger)
        self.bar = ProgressBar(interval)
        self.status = StatusLogger(run, patcher, interval, clock)

    @classmethod
    def from_env(cls, run: int | None = None, **kw) -> Reporter:
        from .kube_status import BackgroundPatcher, StatusPatcher

        patcher = StatusPatcher.from_env()
        return cls(run=patcher.run if patcher else run, patcher=BackgroundPatcher(patcher) if patcher else None, **kw)

    @property
    def run(self) -> int | None:
        return self.status.progress.run

    @property
    def patcher(self):
        return self.status.patcher

    @property
    def progress(self) -> Progress:
        return self.status.progress

    # --- what stages call ----------------------------------------------------------------------
    def stage(self, stage: str, message: str | None = None) -> None:
        self.bar.close()
        log.info("== stage %s%s", stage, f": {message}" if message else "")
        self.status.update(force=True, stage=stage, message=message or f"{stage}")

    def message(self, text: str) -> None:
        log.info("%s", text)
        self.status.update(message=text)

    def work(self, text: str, percent: float | None = None, eta_seconds: int | None = None) -> None:
        """Progress of a stage counted in work items (evaluation requests): message, percent and ETA."""
        update: dict[str, Any] = {"message": text}
        if percent is not None:
            update["percent"] = int(percent)
        if eta_seconds is not None:
            update["eta_seconds"] = int(eta_seconds)
        log.info("%s", text)
        self.status.update(force=percent == 100, **update)

    def train_step(self, step: int, total_steps: int, metrics: dict[str, Any]) -> None:
        """Called after every optimizer step: each metric logger gets the step's metrics, the status last.
        A failing logger is logged and skipped: reporting never stops training."""
        metrics = {**metrics, "totalSteps": total_steps}
        for logger in (*self.metric_loggers, self.bar, self.status):
            try:
                logger.log(step, metrics)
            except (OSError, ValueError) as exc:
                log.warning("metric logger %s failed: %s", type(logger).__name__, exc)

    def eval_loss(self, step: int, loss: float | None) -> None:
        """The validation loss after training (the periodic ones come with train_step): sent at once."""
        if loss is not None:
            self.status.update(force=True, **self.status.eval_fields(step, loss))

    def start_training(self, step: int, total_steps: int, restarts: int, last_loss: float | None = None) -> None:
        """Where training starts: step 0, or the resumed checkpoint's step, so a status read after a resume
        that found every step done (a pod killed after the last checkpoint) still says how far it got."""
        update: dict[str, Any] = {"restarts": restarts, "step": step, "total_steps": total_steps,
                                  "percent": int(100 * step / max(total_steps, 1))}
        if last_loss is not None:
            update["loss"] = round(float(last_loss), 5)
        self.status.update(send=False, **update)

    def finish(self, metrics: dict[str, Any], artifacts: list[Artifact], attempts: int = 4) -> None:
        """The completion report: the operator calls a run Succeeded only once it holds these artifacts,
        so a report that cannot be delivered fails the attempt (the Job retries; every stage is done)."""
        self.bar.close()
        self.status.update(send=False, message="done", percent=100, updated_at=now_rfc3339())
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
        self.bar.close()
        close = getattr(self.patcher, "close", None)
        if close is not None:
            close(timeout)
