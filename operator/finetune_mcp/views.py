"""Pure: FinetuneJob objects → what the tools return, and the progress that `wait` notifies.

Nothing here reads Secrets, and nothing returned carries more than a Secret's name: the spec only
ever references them (`credentialsSecretRef`, `tokenSecretRef`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_api.status import Phase

from .jobs import InvalidArguments

# Share of the whole run each stage stands for, so progress only ever grows across stages.
STAGE_SPAN: dict[str, tuple[float, float]] = {
    "Pending": (0, 2), "Queued": (0, 2), "Suspended": (0, 2), "Preparing": (2, 5), "Training": (5, 85),
    "Exporting": (85, 92), "Evaluating": (92, 97), "Uploading": (97, 99.5),
    "Succeeded": (100, 100), "Failed": (100, 100),
}


def ref(obj: dict[str, Any]) -> dict[str, str]:
    meta = obj.get("metadata") or {}
    return {"name": meta.get("name", ""), "namespace": meta.get("namespace", "")}


def picked_up(obj: dict[str, Any]) -> bool:
    """The operator has acted on the object's latest spec (a new run started, or it was refused)."""
    status = obj.get("status") or {}
    generation = (obj.get("metadata") or {}).get("generation")
    return bool(status.get("run") or status.get("phase")) and status.get("observedGeneration") == generation


def finished(obj: dict[str, Any]) -> bool:
    phase = (obj.get("status") or {}).get("phase")
    return picked_up(obj) and phase in (Phase.SUCCEEDED, Phase.FAILED)


def _spec_summary(spec: dict[str, Any]) -> dict[str, Any]:
    base = spec.get("baseModel") or {}
    dataset = spec.get("dataset") or {}
    training = spec.get("training") or {}
    out = {
        "baseModel": base.get("uri") or base.get("name"),
        "dataset": dataset.get("source") or (
            "configmap:{name}/{key}".format(**dataset["configMapRef"]) if dataset.get("configMapRef") else None),
        "epochs": training.get("epochs"), "maxSteps": training.get("maxSteps"),
        "learningRate": training.get("learningRate"), "loraR": (training.get("lora") or {}).get("r"),
        "method": training.get("method"), "gguf": (spec.get("export") or {}).get("gguf"),
        "evaluation": spec.get("evaluation"),
    }
    return {k: v for k, v in out.items() if v is not None}


def progress_line(status: dict[str, Any]) -> str:
    """`run 2 Training: step 3/8, loss 1.234, 212 tok/s, ETA 12 s` — what a person wants to read."""
    phase = status.get("phase") or "Pending"
    progress = status.get("progress") or {}
    bits = []
    if progress.get("step") is not None and progress.get("totalSteps"):
        bits.append(f"step {progress['step']}/{progress['totalSteps']}")
    if progress.get("loss") is not None:
        bits.append(f"loss {progress['loss']:.4g}")
    if progress.get("tokensPerSecond"):
        bits.append(f"{progress['tokensPerSecond']:.0f} tok/s")
    if progress.get("etaSeconds") is not None and phase == Phase.TRAINING:
        bits.append(f"ETA {progress['etaSeconds']} s")
    if not bits and (progress.get("message") or status.get("message")):
        bits.append(str(progress.get("message") or status.get("message")))
    head = f"run {status.get('run') or '?'} {phase}"
    return f"{head}: {', '.join(bits)}" if bits else head


def progress_value(status: dict[str, Any]) -> float:
    """0..100 over the whole run: training steps fill most of it, the other stages their share."""
    phase = status.get("phase") or "Pending"
    low, high = STAGE_SPAN.get(phase, (0, 0))
    progress = status.get("progress") or {}
    if phase == Phase.TRAINING and progress.get("totalSteps"):
        return low + (high - low) * min(1.0, (progress.get("step") or 0) / progress["totalSteps"])
    return low


@dataclass
class ProgressTracker:
    """Turns successive statuses into MCP progress notifications: one per change, values strictly
    increasing as the protocol requires."""

    last_value: float = -1.0
    last_message: str | None = None

    def update(self, status: dict[str, Any]) -> tuple[float, str] | None:
        message = progress_line(status)
        if message == self.last_message:
            return None
        value = max(progress_value(status), self.last_value + 0.001)
        self.last_value, self.last_message = value, message
        return round(value, 3), message


def summary(obj: dict[str, Any]) -> dict[str, Any]:
    """One FinetuneJob, as get_status returns it."""
    status = obj.get("status") or {}
    meta = obj.get("metadata") or {}
    conditions = {c["type"]: {k: c.get(k) for k in ("status", "reason", "message")}
                  for c in status.get("conditions") or []}
    out = {
        **ref(obj),
        "phase": status.get("phase") or "Pending",
        "run": status.get("run"),
        "upToDate": picked_up(obj),  # false until the operator has seen the latest spec
        "reason": status.get("reason"),
        "message": status.get("message"),
        "progress": status.get("progress"),
        "progressLine": progress_line(status),
        "metrics": status.get("metrics"),
        "outputUri": status.get("outputUri"),
        "startTime": status.get("startTime"),
        "completionTime": status.get("completionTime"),
        "conditions": conditions,
        "spec": _spec_summary(obj.get("spec") or {}),
        "history": [history_entry(h) for h in status.get("history") or []],
        "generation": meta.get("generation"),
    }
    return {k: v for k, v in out.items() if v not in (None, [], {})}


def history_entry(entry: dict[str, Any]) -> dict[str, Any]:
    keep = ("run", "phase", "reason", "message", "outputUri", "metrics", "startTime", "completionTime")
    return {k: entry[k] for k in keep if entry.get(k) is not None}


def list_row(obj: dict[str, Any]) -> dict[str, Any]:
    status = obj.get("status") or {}
    progress = status.get("progress") or {}
    row = {**ref(obj), "phase": status.get("phase") or "Pending", "run": status.get("run"),
           "percent": progress.get("percent"), "loss": progress.get("loss"),
           "created": (obj.get("metadata") or {}).get("creationTimestamp"),
           "baseModel": _spec_summary(obj.get("spec") or {}).get("baseModel")}
    return {k: v for k, v in row.items() if v is not None}


def artifacts(obj: dict[str, Any], run: int | None = None) -> dict[str, Any]:
    """A run's artifacts: the current run's from status.artifacts; an earlier run's S3 prefix (its
    manifest.json lists every file with size and SHA-256)."""
    status = obj.get("status") or {}
    current = status.get("run")
    if run is None or run == current:
        arts = status.get("artifacts") or []
        out = {**ref(obj), "run": current, "phase": status.get("phase"), "outputUri": status.get("outputUri"),
               "artifacts": arts,
               "gguf": {a["quantization"]: a["uri"] for a in arts if a.get("kind") == "gguf" and a.get("quantization")}}
        if not arts:
            out["note"] = (f"run {current} has uploaded nothing yet (phase {status.get('phase') or 'Pending'}); "
                           "artifacts appear when it reaches Succeeded")
        return out
    for entry in status.get("history") or []:
        if entry.get("run") == run:
            uri = entry.get("outputUri")
            return {**ref(obj), "run": run, "phase": entry.get("phase"), "outputUri": uri, "artifacts": [],
                    "note": f"only the current run's artifacts are listed in status; run {run}'s files are under "
                            f"{uri}, listed with sizes and SHA-256 in {uri.rstrip('/')}/manifest.json" if uri else
                            f"run {run} recorded no output location"}
    raise InvalidArguments(f"run: {obj['metadata']['name']} has no run {run} (current run {current}; history "
                      f"{[h.get('run') for h in status.get('history') or []]})")
