"""Prometheus metrics of the operator, served on FINETUNE_METRICS_PORT (0 disables)."""

from __future__ import annotations

import logging
import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

RECONCILE_SECONDS = Histogram("finetune_reconcile_seconds", "Time spent in ensure_run")
ERRORS = Counter("finetune_errors_total", "FinetuneJobs failed by the operator, by reason", ["reason"])
TRANSITIONS = Counter("finetune_phase_transitions_total", "Phase transitions written, by new phase", ["phase"])
JOBS = Gauge("finetune_jobs", "FinetuneJobs seen, by phase", ["phase"])

_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()
_started = False


def observe_phase(namespace: str, name: str, phase: str | None) -> None:
    with _lock:
        _phases[(namespace, name)] = phase or "Pending"
        counts: dict[str, int] = {}
        for p in _phases.values():
            counts[p] = counts.get(p, 0) + 1
        for p, n in counts.items():
            JOBS.labels(phase=p).set(n)


def forget(namespace: str, name: str) -> None:
    with _lock:
        phase = _phases.pop((namespace, name), None)
        if phase is not None:
            JOBS.labels(phase=phase).set(sum(1 for p in _phases.values() if p == phase))


def start_server(port: int) -> None:
    global _started
    if _started or not port:
        return
    try:
        start_http_server(port)
        _started = True
    except OSError as exc:  # e.g. a second operator in one test process
        log.warning("metrics server not started on :%s: %s", port, exc)
