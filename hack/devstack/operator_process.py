"""The operator as a real subprocess on the local cluster, configured through env exactly as the Helm
chart configures it (so a caller can SIGKILL and restart it like a crashed pod), and small kubectl
helpers: for the tests, the demo and the load benchmark alike.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the checkout (devstack lives in hack/)
CRD = ROOT / "crds" / "finetune.dev_finetunejobs.yaml"
VENV_BIN = Path(sys.executable).parent


def _dev_policy_env() -> dict[str, str]:
    """What a cluster admin would allow for this dev stack: its S3 (SeaweedFS on loopback, the stand-in
    for an in-cluster store) and the folders tests keep models and data in (the stand-in for volumes):
    the cache, the temporary folder and tests/data."""
    from finetune_trainer.paths import cache_dir

    roots = ["/data/", "/models/", "/mnt/", f"{cache_dir()}/", f"{tempfile.gettempdir()}/", f"{ROOT}/tests/data/"]
    return {"FINETUNE_EGRESS_ALLOWED_HOSTS": "127.0.0.1", "FINETUNE_LOCAL_PATH_ROOTS": ",".join(roots)}


DEV_POLICY_ENV = _dev_policy_env()


def kubectl(kubeconfig: Path, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", *args], input=input, text=True,
                          capture_output=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr}")
    return proc


def wait_for(check: Callable[[], Any], timeout: float = 60, what: str = "condition", interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - 'not yet'
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


class OperatorProcess:
    def __init__(self, kubeconfig: Path, namespace: str, log_path: Path, extra_env: dict[str, str] | None = None):
        self.kubeconfig, self.namespace, self.log_path = kubeconfig, namespace, log_path
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> OperatorProcess:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "FINETUNE_WATCH_NAMESPACES": self.namespace,
               "FINETUNE_METRICS_PORT": "0", "FINETUNE_LIVENESS_ENDPOINT": "off",
               "FINETUNE_TRAINER_IMAGE": "finetune-trainer:test", "FINETUNE_PROGRESS_INTERVAL": "1",
               "PYTHONUNBUFFERED": "1", **DEV_POLICY_ENV,
               "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", **self.extra_env}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([str(VENV_BIN / "finetune-operator")], env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
