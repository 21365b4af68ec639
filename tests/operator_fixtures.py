"""Fixtures for tests that run the operator against the real local cluster. The operator runs as a
real subprocess (devstack.operator_process), so tests can SIGKILL and restart it like a crashed pod.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.operator_process import (  # noqa: F401 - the tests import them from here
    CRD,
    ROOT,
    OperatorProcess,
    kubectl,
    wait_for,
)


@pytest.fixture(scope="session")
def crd(kubeconfig) -> Path:
    kubectl(kubeconfig, "apply", "--server-side", "-f", str(CRD))
    # `kubectl wait` errors while the CRD has no status yet, so poll it.
    wait_for(lambda: kubectl(kubeconfig, "wait", "--for=condition=Established", "--timeout=10s",
                             "crd/finetunejobs.finetune.dev", check=False).returncode == 0, 60, "CRD Established")
    # Discovery of the new resource takes a moment; kubectl get proves it is served.
    wait_for(lambda: kubectl(kubeconfig, "get", "ftj", "-A", check=False).returncode == 0, 30, "ftj served")
    return CRD


@pytest.fixture
def operator(crd, kubeconfig, namespace, tmp_path):
    op = OperatorProcess(kubeconfig, namespace, tmp_path / "operator.log").start()
    yield op
    op.stop()
    print("---- operator log ----\n" + op.log()[-6000:])  # pytest shows it only when the test failed


class Cluster:
    """Small read helpers over kubectl -o json for assertions."""

    def __init__(self, kubeconfig: Path, namespace: str):
        self.kubeconfig, self.namespace = kubeconfig, namespace

    def get(self, kind: str, name: str | None = None, selector: str | None = None) -> Any:
        args = ["get", kind, "-n", self.namespace, "-o", "json"]
        if name:
            args.insert(2, name)
        if selector:
            args += ["-l", selector]
        proc = kubectl(self.kubeconfig, *args, check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr:
                return None
            raise AssertionError(proc.stderr)
        return json.loads(proc.stdout)

    def apply(self, manifest: dict | str) -> subprocess.CompletedProcess:
        text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
        return kubectl(self.kubeconfig, "apply", "-n", self.namespace, "-f", "-", input=text, check=False)

    def status(self, name: str) -> dict:
        obj = self.get("ftj", name) or {}
        return obj.get("status") or {}

    def condition(self, name: str, type_: str) -> dict | None:
        return next((c for c in self.status(name).get("conditions") or [] if c["type"] == type_), None)

    def events(self, name: str) -> list[dict]:
        items = (self.get("events") or {}).get("items", [])
        return [e for e in items if e.get("involvedObject", {}).get("name") == name]


@pytest.fixture
def k8s(kubeconfig, namespace) -> Cluster:
    return Cluster(kubeconfig, namespace)
