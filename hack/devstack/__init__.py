"""Dev/test harness for finetune-operator: NOT product code.

It starts a real local control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
kwok), a real S3 server (SeaweedFS) and a *local pod runner* that executes the pods bound to one
node as local processes, because the development machines have no container runtime.

Used by the pytest plugin in tests/conftest.py and by `python -m devstack` (the demo).
"""

from devstack.cluster import CPU_NODE, GPU_LABEL, GPU_NODE, LocalCluster
from devstack.node import NODE_LABEL, NODE_NAME
from devstack.podrunner import LocalPodRunner
from devstack.s3 import S3Server

__all__ = ["CPU_NODE", "GPU_LABEL", "GPU_NODE", "NODE_LABEL", "NODE_NAME", "LocalCluster", "LocalPodRunner", "S3Server"]
