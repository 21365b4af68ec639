"""The Node the local pod runner stands behind: registered, then kept Ready like a kubelet would."""

from __future__ import annotations

from datetime import UTC, datetime

from devstack.kube import Kube

NODE_NAME = "local-runner"
NODE_LABEL = "finetune.dev/local-runner"
# Generous on purpose: the node must admit what the chart asks for a GPU trainer, not what this host has.
NODE_RESOURCES = {"cpu": "64", "memory": "256Gi", "pods": "110", "ephemeral-storage": "1Ti", "nvidia.com/gpu": "8"}
LEASES = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"


def now(micro: bool = False) -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


class RunnerNode:
    def __init__(self, kube: Kube, name: str = NODE_NAME, labels: dict[str, str] | None = None):
        self.kube, self.name = kube, name
        self.labels = {NODE_LABEL: "true"} if labels is None else labels
        self.since = now()

    def register(self) -> None:
        # No kwok annotation: kwok must leave this node (and its pods) alone.
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.name,
                             "labels": {**self.labels, "kubernetes.io/hostname": self.name,
                                        "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}}}
        if self.kube.get(f"/api/v1/nodes/{self.name}") is None:
            self.kube.post("/api/v1/nodes", node)
        self.heartbeat()

    def heartbeat(self) -> None:
        beat = now()
        conditions = [
            {"type": t, "status": "False", "reason": f"KubeletHasNo{t}", "lastHeartbeatTime": beat,
             "lastTransitionTime": self.since} for t in ("MemoryPressure", "DiskPressure", "PIDPressure")
        ] + [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "local pod runner is ready",
              "lastHeartbeatTime": beat, "lastTransitionTime": self.since}]
        status = {"capacity": NODE_RESOURCES, "allocatable": NODE_RESOURCES, "conditions": conditions,
                  "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                                {"type": "Hostname", "address": self.name}],
                  "nodeInfo": {"kubeletVersion": "local-pod-runner", "operatingSystem": "linux",
                               "architecture": "amd64", "containerRuntimeVersion": "local://processes",
                               "kernelVersion": "", "osImage": "", "kubeProxyVersion": "", "machineID": "",
                               "systemUUID": "", "bootID": ""}}
        self.kube.patch(f"/api/v1/nodes/{self.name}/status", {"status": status})
        # The node lifecycle controller judges liveness by this Lease; without renewals the node goes
        # NotReady after ~50 s and its pods get evicted.
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": 40, "renewTime": now(micro=True)}
        lease = self.kube.get(f"{LEASES}/{self.name}")
        if lease is None:
            self.kube.post(LEASES, {"metadata": {"name": self.name}, "spec": spec})
        else:
            self.kube.put(f"{LEASES}/{self.name}", {**lease, "spec": {**lease["spec"], **spec}})
