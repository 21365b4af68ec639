"""Prometheus metrics of the operator, served on FINETUNE_METRICS_PORT (0 disables)."""

from __future__ import annotations

import logging
import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from finetune_api.status import Phase

log = logging.getLogger(__name__)

RECONCILE_SECONDS = Histogram("finetune_reconcile_seconds", "Time spent in ensure_run")
# One per Warning Event (a run failed, or a generation waits on a missing object): transitions, not retries.
ERRORS = Counter("finetune_errors_total", "Warning Events of FinetuneJobs (failures and waits), by reason",
                 ["reason"])
TRANSITIONS = Counter("finetune_phase_transitions_total", "Phase transitions written, by new phase", ["phase"])
JOBS = Gauge("finetune_jobs", "FinetuneJobs seen, by phase", ["phase"])
GPU_HOURS = Counter("finetune_gpu_hours_total", "GPU-hours of finished runs (start to completion x GPUs), by namespace",
                    ["namespace"])
STATUS_WRITE_WAIT = Counter("finetune_status_write_wait_seconds_total", "Seconds status writes waited for the rate limit")

_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()
_started = False


def _publish() -> None:
    """Every phase's count, zeros included, so a phase that empties drops to 0 instead of going stale."""
    for phase in Phase:
        JOBS.labels(phase=phase.value).set(sum(1 for p in _phases.values() if p == phase.value))


def observe_phase(namespace: str, name: str, phase: str | None) -> None:
    with _lock:
        _phases[(namespace, name)] = phase or Phase.PENDING.value
        _publish()


def live_jobs() -> int:
    """FinetuneJobs seen in a phase that is not finished."""
    with _lock:
        return sum(1 for p in _phases.values() if not Phase(p).finished)


def forget(namespace: str, name: str) -> None:
    with _lock:
        _phases.pop((namespace, name), None)
        _publish()


def start_server(port: int) -> None:
    global _started
    if _started or not port:
        return
    try:
        start_http_server(port)
        _started = True
    except OSError as exc:  # e.g. a second operator in one test process
        log.warning("metrics server not started on :%s: %s", port, exc)
