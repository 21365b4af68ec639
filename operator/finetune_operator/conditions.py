"""metav1.Condition bookkeeping: one helper sets a condition, stamping generation and transition time."""

from __future__ import annotations

from typing import Any

from finetune_api.status import now_rfc3339

MAX_MESSAGE = 32768


def set_condition(conditions: list[dict[str, Any]] | None, type_: str, status: bool | str, reason: str,
                  message: str = "", generation: int | None = None, now: str | None = None) -> list[dict[str, Any]]:
    """Returns a new list with `type_` set; lastTransitionTime moves only when the status flips."""
    status_str = status if isinstance(status, str) else ("True" if status else "False")
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    out = [dict(cond) for cond in conditions or []]
    for cond in out:
        if cond.get("type") == type_:
            if cond.get("status") != status_str:
                cond["lastTransitionTime"] = now or now_rfc3339()
            cond.update(status=status_str, reason=reason, message=message)
            if generation is not None:
                cond["observedGeneration"] = generation
            return out
    new = {"type": type_, "status": status_str, "reason": reason, "message": message,
           "lastTransitionTime": now or now_rfc3339()}
    if generation is not None:
        new["observedGeneration"] = generation
    return [*out, new]

