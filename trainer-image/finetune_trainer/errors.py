"""Failures the operator can act on: a configuration error (exit 42, do not retry) or a transient one
(exit 75, retry and resume from the newest checkpoint).

Each carries a CamelCase reason. The CLI writes `{"reason": ..., "message": ...}` as one line to the
container's termination-message path, where the operator reads it into the FinetuneJob's status.
"""

from __future__ import annotations

import json
import os
import re

from finetune_api import contract

# Environment variables whose values must never appear in logs or termination messages.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class TrainerError(Exception):
    exit_code = 1

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class ConfigError(TrainerError):
    """Bad spec, data, model or credentials: retrying the same run cannot succeed."""

    exit_code = contract.EXIT_CONFIG_ERROR


class TransientError(TrainerError):
    """S3 or network trouble, preemption: the Job retries and resumes."""

    exit_code = contract.EXIT_TRANSIENT


def redact(text: str) -> str:
    """Removes the values of secret environment variables (and a URL's userinfo) from text."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", text)


def write_termination_message(reason: str, message: str) -> None:
    path = os.environ.get(contract.ENV_TERMINATION_LOG, contract.TERMINATION_LOG)
    # The kubelet reads at most 4 KiB; keep the line well under it.
    line = json.dumps({"reason": reason, "message": redact(message)[:3000]})
    try:
        # Under torchrun a pod's processes share the file: the first failure is the cause, the others'
        # (a lost peer) follow from it.
        if int(os.environ.get("WORLD_SIZE", 1)) > 1 and os.path.exists(path) and os.path.getsize(path):
            return
        with open(path, "w") as f:
            f.write(line + "\n")
    except OSError:
        pass  # not in a pod (or not writable): the log line is enough
