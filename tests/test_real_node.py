"""A real node beside the kwok nodes: kubelet (built from the control plane's own Kubernetes tree) and
containerd, joined to the local control plane (devstack.realnode; hack/real-node.sh provides them).

The project's images run there as pods the kubelet really starts: non-root, read-only root
filesystem, emptyDirs, the projected ServiceAccount token. In the trainer-image tier the chart runs
the operator there and a FinetuneJob's pod trains and uploads there, reaching the loopback-only
apiserver and S3 from the pod network through DNAT (RealNode.forward_to_loopback; docs/images.md).
"""

from __future__ import annotations

import json
import secrets
from urllib.parse import urlparse

import pytest
import trainer_fixtures as fx
import yaml
from operator_fixtures import kubectl, wait_for
from test_chart import CHART, adopt_crd, deployment_available, helm, run, values_args  # noqa: F401 - helm: fixture
from test_images import ROWS

from devstack.oci import ImageStore
from devstack.realnode import GATEWAY, LABELS, NODE, RealNode

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


@pytest.mark.trainer_image
def test_the_chart_runs_the_operator_and_a_finetunejob_on_the_real_node(kubeconfig, namespace, real_node, crd, s3,
                                                                        helm, tmp_path):  # noqa: F811
    """The whole product on a real kubelet: `helm install` runs the operator's image as a Deployment there,
    the operator makes the Job, the kubelet runs its pod from the trainer image (uid 1000, read-only root,
    the projected token), and both reach the apiserver through the `kubernetes` Service's ClusterIP and the
    trainer reaches S3, from the pod network (forward_to_loopback stands in for kube-proxy)."""
    images = {kind: real_node.store.images[kind] for kind in ("operator", "trainer")}
    for image in images.values():
        assert real_node.store.has(image), f"{image} is not built: run hack/images.sh"
        real_node.load_image(image)
    service = json.loads(kubectl(kubeconfig, "get", "service", "kubernetes", "-n", "default", "-o", "json").stdout)
    server = json.loads(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    real_node.forward_to_loopback(service["spec"]["clusterIP"], service["spec"]["ports"][0]["port"],
                                  urlparse(server).port)
    s3_port = urlparse(s3.endpoint).port
    real_node.forward_to_loopback(GATEWAY, s3_port, s3_port)
    endpoint = f"http://{GATEWAY}:{s3_port}"

    bucket = f"real-node-{secrets.token_hex(4)}"
    client = s3.client()
    client.create_bucket(Bucket=bucket)
    for f in fx.tiny_gemma().iterdir():  # the model comes from S3: the node has no volume holding it
        if f.is_file() and not f.name.startswith("."):
            client.upload_file(str(f), bucket, f"models/tiny/{f.name}")
    apply = lambda obj: kubectl(kubeconfig, "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(obj))  # noqa: E731
    apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"},
           "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}})
    apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "rows"},
           "data": {"train.jsonl": "\n".join(json.dumps(r) for r in ROWS)}})

    release = f"fto-{namespace[-6:]}"
    on_node = {"finetune.dev/real-node": "true"}
    (op_repo, _, op_tag), (tr_repo, _, tr_tag) = (images[k].rpartition(":") for k in ("operator", "trainer"))
    values = {  # the operator's own ports stay on: the pod has its own network namespace here
        "image": {"repository": op_repo, "tag": op_tag, "pullPolicy": "Never"}, "nodeSelector": on_node,
        "watchNamespaces": [namespace],
        "trainer": {"image": {"repository": tr_repo, "tag": tr_tag, "pullPolicy": "Never"}, "nodeSelector": on_node},
        "security": {"egress": {"allowHttp": True, "allowedHosts": [GATEWAY]}},
    }
    helm_kube = [f"--kubeconfig={kubeconfig}", "--namespace", namespace]
    adopt_crd(kubeconfig, release, namespace)
    run([helm, "install", release, str(CHART), *helm_kube, "--timeout", "3m", *values_args(tmp_path, values)])
    try:
        deployment_available(kubeconfig, namespace, f"{release}-finetune-operator")
        apply({"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": "on-node"},
               "spec": {"baseModel": {"uri": f"s3://{bucket}/models/tiny"},
                        "dataset": {"configMapRef": {"name": "rows", "key": "train.jsonl"}, "format": "alpaca"},
                        "training": {"maxSteps": 2, "batchSize": 2, "maxSeqLength": 64},
                        "export": {"gguf": ["q8_0"], "paritySamples": 2},
                        "output": {"s3": {"bucket": bucket, "endpoint": endpoint, "forcePathStyle": True,
                                          "credentialsSecretRef": {"name": "s3"}}},
                        "resources": {"gpus": 0}}})

        def finished():
            obj = json.loads(kubectl(kubeconfig, "-n", namespace, "get", "ftj", "on-node", "-o", "json").stdout)
            return (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed") and obj["status"]

        status = wait_for(finished, 900, "the FinetuneJob to finish on the real node", interval=2)
        pods = json.loads(kubectl(kubeconfig, "-n", namespace, "get", "pods", "-o", "json").stdout)["items"]
        logs = {p["metadata"]["name"]: real_node.pod_log(namespace, p["metadata"]["name"],
                                                         p["spec"]["containers"][0]["name"])[-4000:] for p in pods}
        assert status["phase"] == "Succeeded", (status, logs)
    finally:
        run([helm, "uninstall", release, *helm_kube, "--wait"], check=False)
    by_image = {p["spec"]["containers"][0]["image"]: p for p in pods}
    assert set(by_image) == set(images.values()), logs  # the operator's pod and the trainer's, nothing else
    assert all(p["spec"]["nodeName"] == NODE for p in pods)
    # The trainer's own status patches came through the ClusterIP: its steps and the completion report.
    assert (status["progress"]["step"], status["progress"]["totalSteps"]) == (2, 2), status
    assert any(a["name"].endswith(".gguf") for a in status["artifacts"]), status
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.endswith(".gguf") for k in keys), keys
