"""A real node beside the kwok nodes: kubelet (built from the control plane's own Kubernetes tree) and
containerd, joined to the local control plane (devstack.realnode; hack/real-node.sh provides them).

The project's images run there as pods the kubelet really starts: non-root, read-only root
filesystem, emptyDirs, the projected ServiceAccount token. A FinetuneJob's pod does not run there
yet: pods on the bridge network cannot reach the loopback-only apiserver and S3 (docs/images.md).
"""

from __future__ import annotations

import json

import pytest
import yaml
from operator_fixtures import kubectl, wait_for

from devstack.oci import ImageStore
from devstack.realnode import LABELS, NODE, RealNode

pytest_plugins = ["operator_fixtures"]
pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def real_node(kubeconfig):
    node = RealNode(kubeconfig, ImageStore.from_cache())
    try:
        node.start()
        yield node
    finally:
        print("---- kubelet ----\n" + (node.procs[1].tail(6000) if len(node.procs) > 1 else ""))
        node.stop()


def run_pod(kubeconfig, namespace, real_node: RealNode, name: str, kind: str, uid: int, script: str,
            mounts: dict[str, str]) -> tuple[dict, str]:
    image = real_node.store.images[kind]
    assert real_node.store.has(image), f"the {kind} image {image} is not built: run hack/images.sh"
    real_node.load_image(image)
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"finetune.dev/real-node": "true"}, "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid},
            "containers": [{
                "name": "main", "image": image, "imagePullPolicy": "Never", "command": ["python", "-c", script],
                "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [{"name": vol, "mountPath": path} for vol, path in mounts.items()]}],
            "volumes": [{"name": vol, "emptyDir": {}} for vol in mounts],
        },
    }
    kubectl(kubeconfig, "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(pod))

    def done():
        obj = json.loads(kubectl(kubeconfig, "-n", namespace, "get", "pod", name, "-o", "json").stdout)
        return obj["status"].get("phase") in ("Succeeded", "Failed") and obj

    obj = wait_for(done, 300, f"pod {name} to finish on the real node", interval=1)
    return obj, real_node.pod_log(namespace, name, "main")


def test_the_real_node_joins_beside_the_kwok_nodes(kubeconfig, real_node):
    nodes = json.loads(kubectl(kubeconfig, "get", "nodes", "-o", "json").stdout)["items"]
    by_name = {n["metadata"]["name"]: n for n in nodes}
    node = by_name[NODE]
    assert LABELS.items() <= node["metadata"]["labels"].items()
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.36.3" and info["containerRuntimeVersion"].startswith("containerd://")
    assert any(n["metadata"].get("annotations", {}).get("kwok.x-k8s.io/node") == "fake" for n in nodes)


def test_operator_image_runs_as_a_real_pod(kubeconfig, namespace, real_node):
    script = ("import os, finetune_operator, kopf; open('/tmp/probe', 'w').write('x'); "
              "print('uid', os.getuid(), 'gid', os.getgid()); print('root writable', os.access('/opt', os.W_OK)); "
              "print('namespace', open('/var/run/secrets/kubernetes.io/serviceaccount/namespace').read())")
    pod, log = run_pod(kubeconfig, namespace, real_node, "operator-image", "operator",
                       65532, script, {"tmp": "/tmp"})
    assert pod["status"]["phase"] == "Succeeded", (pod["status"], log)
    assert pod["spec"]["nodeName"] == NODE
    assert "uid 65532 gid 65532" in log and "root writable False" in log, log
    assert f"namespace {namespace}" in log, log


@pytest.mark.trainer_image
def test_trainer_image_runs_as_a_real_pod(kubeconfig, namespace, real_node):
    # The trainer's own stack imports and its CLI answers, as uid 1000 with only its emptyDirs writable.
    script = ("import os, subprocess, torch, transformers, peft, llama_cpp, finetune_trainer; "
              "open('/workspace/probe', 'w').write('x'); open('/tmp/probe', 'w').write('x'); "
              "print('uid', os.getuid(), 'torch', torch.__version__, 'cuda', torch.cuda.is_available()); "
              "print('root writable', os.access('/opt', os.W_OK)); "
              "print(subprocess.run(['finetune', '--help'], capture_output=True, text=True).stdout[:200])")
    pod, log = run_pod(kubeconfig, namespace, real_node, "trainer-image", "trainer",
                       1000, script, {"workspace": "/workspace", "tmp": "/tmp"})
    assert pod["status"]["phase"] == "Succeeded", (pod["status"], log)
    assert "uid 1000 torch 2.11.0" in log and "cuda False" in log and "root writable False" in log, log
    assert "usage: finetune" in log, log
