"""Reports progress into the FinetuneJob's status subresource, the channel agreed in
finetune_api.contract: a JSON Patch whose first op tests `/status/run`, so a trainer of an older run
can never overwrite a newer run's fields.

Credentials are the pod's service account token and CA, read from FINETUNE_SERVICEACCOUNT_DIR (default
the in-cluster path); the apiserver address from KUBERNETES_SERVICE_HOST/PORT. We build the client's
Configuration ourselves rather than rely on load_incluster_config's fixed paths.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from pathlib import Path
from typing import Any

from finetune_api import GROUP, PLURAL, VERSION, contract

log = logging.getLogger(__name__)
JSON_PATCH = "application/json-patch+json"


class StatusPatcher:
    def __init__(self, namespace: str, name: str, run: int, sa_dir: Path, host: str, timeout: float = 10.0):
        from kubernetes import client

        self.namespace, self.name, self.run = namespace, name, run
        self.timeout = timeout
        self.enabled = True
        cfg = client.Configuration()
        cfg.host = host
        # Re-read the token on every request: projected tokens are rotated while a long run is going.
        # The client looks the token up as "BearerToken" (kubernetes >= 36) or "authorization" (older).
        token_file = sa_dir / "token"

        def load_token(c) -> None:
            token = token_file.read_text().strip()
            c.api_key = {"BearerToken": token, "authorization": token}

        cfg.refresh_api_key_hook = load_token
        load_token(cfg)
        cfg.api_key_prefix = {"BearerToken": "Bearer", "authorization": "Bearer"}
        ca = sa_dir / "ca.crt"
        if ca.exists():
            cfg.ssl_ca_cert = str(ca)
        cfg.retries = 2
        self.api = client.CustomObjectsApi(client.ApiClient(cfg))

    @classmethod
    def from_env(cls, run: int | None = None) -> StatusPatcher | None:
        """A patcher when the operator's env vars name a job; None when run by hand.
        run: another run than the environment's (a warm trainer's next, warm.py)."""
        env = os.environ
        name, namespace, run = env.get(contract.ENV_JOB_NAME), env.get(contract.ENV_JOB_NAMESPACE), run or env.get(contract.ENV_RUN)
        if not (name and namespace and run):
            return None
        sa_dir = Path(env.get(contract.ENV_SERVICEACCOUNT_DIR) or contract.DEFAULT_SERVICEACCOUNT_DIR)
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        if not host or not (sa_dir / "token").exists():
            log.warning("status reporting disabled: no apiserver address or service account token in %s", sa_dir)
            return None
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # IPv6
        try:
            return cls(namespace, name, int(run), sa_dir, f"https://{host}:{port}")
        except Exception as exc:  # noqa: BLE001 - reporting must never stop training
            log.warning("status reporting disabled: %s", exc)
            return None

    def patch(self, **fields: Any) -> bool:
        """Sends one patch; returns False (and stops reporting for good) when a newer run owns the status."""
        if not self.enabled:
            return False
        from kubernetes.client.exceptions import ApiException

        body = contract.progress_patch(self.run, **fields)
        try:
            self.api.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, PLURAL, self.name, body,
                _content_type=JSON_PATCH, _request_timeout=self.timeout)
            return True
        except ApiException as exc:
            if exc.status == 422:  # the test op failed: status.run is no longer ours
                log.warning("status of %s/%s now belongs to another run (not %d); stop reporting",
                            self.namespace, self.name, self.run)
                self.enabled = False
                return False
            if exc.status == 404:
                log.warning("FinetuneJob %s/%s is gone; stop reporting", self.namespace, self.name)
                self.enabled = False
                return False
            log.warning("status patch failed: HTTP %s %s", exc.status, exc.reason)
        except Exception as exc:  # noqa: BLE001 - network trouble must not kill training
            log.warning("status patch failed: %s", exc)
        return False


class BackgroundPatcher:
    """A StatusPatcher driven from its own thread, so a slow or unreachable apiserver (each patch may
    wait its timeout, with retries) never stalls a training step.

    Every progress patch carries the whole progress object, so of the step-by-step patches only the
    newest waiting one matters: patch() replaces a waiting one not yet sent and returns at once.
    milestone() is for what a watcher must see even when the next patch follows at once (a stage
    change and its message, a new eval loss, the last step): milestones are sent in order, each once,
    and only drop the plain patches waiting before them. send() is for the completion report, whose
    delivery decides the attempt: it drops the waiting plain patches, lets the milestones go first
    (within MILESTONE_WAIT seconds), then sends on the caller's thread. close() delivers what is
    waiting, within a bound, before the process exits.
    """

    MAX_WAITING = 64  # milestones kept while the apiserver is away; beyond that the oldest are dropped
    MILESTONE_WAIT = 30.0

    def __init__(self, patcher: StatusPatcher):
        self.inner = patcher
        self.run = patcher.run
        self._queue: list[tuple[bool, dict[str, Any]]] = []  # (milestone, fields), oldest first
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="status-patch", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # a stage command that ends without closing still delivers its last patch

    @property
    def enabled(self) -> bool:
        return self.inner.enabled

    def patch(self, **fields: Any) -> bool:
        """Queues the patch (replacing a plain one still waiting); False once reporting has stopped."""
        return self._put(False, fields)

    def milestone(self, **fields: Any) -> bool:
        """Queues a patch that no later one replaces; False once reporting has stopped."""
        return self._put(True, fields)

    def _put(self, milestone: bool, fields: dict[str, Any]) -> bool:
        if not self.inner.enabled:
            return False
        with self._cond:
            if self._closed:
                return False
            if milestone:  # it carries the newer progress: plain patches waiting before it are moot
                self._queue = [q for q in self._queue if q[0]][-(self.MAX_WAITING - 1):]
                self._queue.append((True, fields))
            elif self._queue and not self._queue[-1][0]:
                self._queue[-1] = (False, fields)
            else:
                self._queue.append((False, fields))
            self._cond.notify_all()
        return True

    def send(self, **fields: Any) -> bool:
        """Sends now, after the patch in flight and the waiting milestones; the result of this very patch."""
        with self._cond:
            self._queue = [q for q in self._queue if q[0]]
            self._cond.wait_for(lambda: not self._queue and not self._busy, self.MILESTONE_WAIT)
            self._queue.clear()
            self._cond.wait_for(lambda: not self._busy)
            self._busy = True
        try:
            return self.inner.patch(**fields)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until nothing is waiting or in flight; False if that took longer than timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float = 15.0) -> None:
        if self._closed:
            return
        delivered = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(1.0 if delivered else 0)
        if not delivered:
            log.warning("status: the last progress patch was not delivered within %.0f s", timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: (self._queue and not self._busy) or self._closed)
                if self._closed:
                    return
                (_, fields), self._busy = self._queue.pop(0), True
            try:
                self.inner.patch(**fields)
            except Exception as exc:  # noqa: BLE001 - patch() logs its own failures; this is a last guard
                log.warning("status patch failed: %s", exc)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
