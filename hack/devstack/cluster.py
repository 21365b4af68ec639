"""A real local control plane: etcd + kube-apiserver + controller-manager + scheduler + kwok.

Everything listens on loopback on free ports and keeps its data and logs in one temp dir, so several
stacks can run side by side and nothing outlives stop().
"""

from __future__ import annotations

import json
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from devstack import binaries
from devstack.kube import Kube
from devstack.procs import Proc, free_port, wait_until

SERVICE_CIDR = "10.0.0.0/24"
KWOK_ANNOTATION = {"kwok.x-k8s.io/node": "fake"}
GPU_NODE = "kwok-gpu-0"
CPU_NODE = "kwok-cpu-0"
GPU_LABEL = "nvidia.com/gpu.present"


def _kwok_node(name: str, extra_labels: dict[str, str], extra_resources: dict[str, str]) -> dict:
    resources = {"cpu": "32", "memory": "256Gi", "pods": "110", **extra_resources}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {**KWOK_ANNOTATION, "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", "type": "kwok", **extra_labels},
        },
        # kwok's node-initialize stage fills in conditions and addresses; capacity is ours to say.
        "status": {"capacity": resources, "allocatable": resources},
    }


KWOK_NODES = [
    _kwok_node(GPU_NODE, {GPU_LABEL: "true", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
               {"nvidia.com/gpu": "8"}),
    _kwok_node(CPU_NODE, {}, {}),
]


class LocalCluster:
    """Start with start() (or a with-block); stop() kills every process and removes the temp dir."""

    def __init__(self, workdir: Path | None = None, keep_workdir: bool = False):
        self.bins = binaries.ensure()
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="fto-cluster-"))
        self.keep_workdir = keep_workdir or workdir is not None
        self.log_dir = self.dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        self.token = secrets.token_hex(16)
        self.port = free_port()
        self.api_url = f"https://127.0.0.1:{self.port}"
        self.startup_seconds: float | None = None

    # --- paths -----------------------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.dir / "admin.kubeconfig"

    @property
    def ca_file(self) -> Path:
        # With --cert-dir and no serving cert given, the apiserver writes a self-signed cert whose file
        # also holds the CA that signed it; it covers 127.0.0.1 and kubernetes.default.svc.
        return self.dir / "pki" / "apiserver.crt"

    @property
    def sa_key(self) -> Path:
        return self.dir / "pki" / "sa.key"

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> LocalCluster:
        t0 = time.monotonic()
        try:
            self._write_pki()
            self._start_etcd()
            self._start_apiserver()
            self._write_kubeconfig()
            self.kube = Kube(self.api_url, self.token, self.ca_file)
            # The rest only needs a ready apiserver: start them together, then wait for each.
            cm_port, sched_port = free_port(), free_port()
            self._start_controller_manager(cm_port)
            self._start_scheduler(sched_port)
            self._create_kwok_nodes()
            self._start_kwok()
            self._wait_healthz("kube-controller-manager", cm_port)
            self._wait_healthz("kube-scheduler", sched_port)
            # Pods can't be created in a namespace before its default ServiceAccount exists, and
            # service-account volumes need kube-root-ca.crt: both come from the controller-manager.
            wait_until(lambda: self._all_alive() and self.kube.get("/api/v1/namespaces/default/serviceaccounts/default"), 120,
                       "the default ServiceAccount")
            wait_until(lambda: self.kube.get("/api/v1/namespaces/default/configmaps/kube-root-ca.crt"), 120,
                       "the kube-root-ca.crt ConfigMap")
            for name in (n["metadata"]["name"] for n in KWOK_NODES):
                wait_until(lambda name=name: self._all_alive() and self._node_ready(name), 120, f"kwok node {name} Ready")
        except Exception as e:
            tails = self.log_tails()  # stop() removes the logs with the temp dir
            self.stop()
            raise RuntimeError(f"local cluster failed to start: {e}\n{tails}") from e
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def restart_apiserver(self) -> None:
        """Fault drills: kill the apiserver and start it again on the same port, certificates and etcd."""
        old = next(p for p in self.procs if p.name == "kube-apiserver")
        old.stop(grace=0)
        self.procs.remove(old)
        self._start_apiserver()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        if not self.keep_workdir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tails(self, max_bytes: int = 3000) -> str:
        """The end of every component's log, for printing when a test fails."""
        return "\n".join(f"===== {p.name} ({p.log_path}) =====\n{p.tail(max_bytes)}" for p in self.procs)

    # --- components ------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, argv, self.log_dir)
        self.procs.append(proc)
        return proc

    def _write_pki(self) -> None:
        pki = self.dir / "pki"
        pki.mkdir()
        # Service-account signing keys; the serving cert is self-signed by the apiserver itself.
        subprocess.run(["openssl", "genrsa", "-out", str(self.sa_key), "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(self.sa_key), "-pubout", "-out", str(pki / "sa.pub")],
                       check=True, capture_output=True)
        (pki / "tokens.csv").write_text(f'{self.token},admin,admin-uid,"system:masters"\n')

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        etcd = self._spawn("etcd", [
            str(self.bins.etcd), "--name=default", f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls={self.etcd_url}", f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}", f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=default=http://127.0.0.1:{peer}",
            # Throwaway data: fsync only costs time.
            "--unsafe-no-fsync=true", "--log-level=warn",
        ])
        wait_until(lambda: etcd.check_alive() and _http_ok(f"{self.etcd_url}/health"), 60, "etcd /health")

    def _start_apiserver(self) -> None:
        pki = self.dir / "pki"
        api = self._spawn("kube-apiserver", [
            str(self.bins.kube_apiserver), f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
            f"--cert-dir={pki}", f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=RBAC", "--allow-privileged=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}", f"--service-account-signing-key-file={self.sa_key}",
            # The `kubernetes` Service's Endpoints may not point at loopback; clients in pods use
            # KUBERNETES_SERVICE_HOST=127.0.0.1 directly instead.
            "--endpoint-reconciler-type=none", "--profiling=false",
        ])
        ctx = ssl._create_unverified_context()  # the serving cert doesn't exist until the apiserver writes it
        wait_until(lambda: api.check_alive() and _http_ok(f"{self.api_url}/readyz", self.token, ctx), 120,
                   "kube-apiserver /readyz")

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fto",
            "clusters": [{"name": "fto", "cluster": {"server": self.api_url, "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [{"name": "fto", "context": {"cluster": "fto", "user": "admin", "namespace": "default"}}],
        }
        self.kubeconfig.write_text(json.dumps(config, indent=2))  # JSON is valid YAML

    def _start_controller_manager(self, port: int) -> None:
        kc = str(self.kubeconfig)
        self._spawn("kube-controller-manager", [
            str(self.bins.kube_controller_manager), f"--kubeconfig={kc}",
            # No delegated authn/authz kubeconfigs: only the always-allowed /healthz is needed.
            "--bind-address=127.0.0.1", f"--secure-port={port}", f"--cert-dir={self.dir / 'cm-certs'}",
            "--leader-elect=false", f"--service-cluster-ip-range={SERVICE_CIDR}",
            # kube-root-ca.crt (and so pods' ca.crt) and legacy SA token secrets.
            f"--root-ca-file={self.ca_file}", f"--service-account-private-key-file={self.sa_key}",
            "--controllers=*", "--use-service-account-credentials=false",
        ])

    def _start_scheduler(self, port: int) -> None:
        kc = str(self.kubeconfig)
        self._spawn("kube-scheduler", [
            str(self.bins.kube_scheduler), f"--kubeconfig={kc}",
            "--bind-address=127.0.0.1", f"--secure-port={port}", f"--cert-dir={self.dir / 'sched-certs'}",
            "--leader-elect=false",
        ])

    def _wait_healthz(self, name: str, port: int) -> None:
        proc = next(p for p in self.procs if p.name == name)
        ctx = ssl._create_unverified_context()  # their serving certs are self-signed in memory
        wait_until(lambda: proc.check_alive() and _http_ok(f"https://127.0.0.1:{port}/healthz", None, ctx), 120,
                   f"{name} /healthz")

    def _create_kwok_nodes(self) -> None:
        for node in KWOK_NODES:
            self.kube.post("/api/v1/nodes", node)

    def _start_kwok(self) -> None:
        # The kwok controller itself (kwokctl would want to run the whole cluster). It fakes only
        # the nodes carrying the annotation; the local pod runner owns its node. Explicit configs
        # (kwokctl's default stages) also keep any ~/.kwok/kwok.yaml out.
        config = self.dir / "kwok.yaml"
        # Run standalone, kwok skips its config defaults (zero parallelism fails), so spell them out.
        config.write_text(json.dumps({
            "apiVersion": "config.kwok.x-k8s.io/v1alpha1", "kind": "KwokConfiguration",
            "options": {"podPlayStageParallelism": 4, "nodePlayStageParallelism": 4, "nodeLeaseParallelism": 4,
                        "podsOnNodeSyncParallelism": 1, "enablePodsOnNodeSyncListPager": True,
                        "enablePodsOnNodeSyncStreamWatch": False, "enableDebuggingHandlers": False}}))
        stages = sorted(self.bins.kwok_stages.glob("*.yaml"))
        self._spawn("kwok", [
            str(self.bins.kwok), f"--kubeconfig={self.kubeconfig}",
            *(f"--config={c}" for c in [config, *stages]),
            "--node-lease-duration-seconds=40",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--cidr=10.0.1.0/24", "--node-ip=127.0.0.1",
            f"--server-address=127.0.0.1:{free_port()}",
        ])

    def _all_alive(self) -> bool:
        return all(p.check_alive() for p in self.procs)  # fail fast, with the log, when one died

    def _node_ready(self, name: str) -> bool:
        node = self.kube.get(f"/api/v1/nodes/{name}") or {}
        return any(c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", []))


def _http_ok(url: str, token: str | None = None, ctx: ssl.SSLContext | None = None) -> bool:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
        return resp.status == 200
