"""The project's real images, run as a cluster runs them (built by hack/images.sh, which
hack/bootstrap.sh runs; nothing here skips for a missing image: the test command builds them).

- Dockerfile.operator's image, installed by the Helm chart as a Deployment on a node whose pods run
  in runc (devstack.containers), runs as uid 65532 with a read-only root filesystem, the chart's
  /tmp emptyDir and its ServiceAccount's projected token, and reconciles a FinetuneJob;
- the Job it creates runs on the same node from Dockerfile.trainer's image (CPU variant) as uid 1000,
  with a read-only root filesystem, emptyDirs at /workspace and /tmp and the Job's env, trains the
  tiny model and uploads its GGUF files to the local S3.

The node shares the host's network (one host, no CNI), so the operator's liveness and metrics ports
are turned off through the chart's extraEnv: they would collide with other stacks on this machine.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
import trainer_fixtures as fx
import yaml
from operator_fixtures import kubectl, wait_for
from test_chart import CHART, adopt_crd, deployment_available, helm, run, values_args  # noqa: F401 - helm: fixture

from devstack.containers import CONTAINER_LABEL, ContainerPodRunner
from devstack.oci import ImageStore, Mount

pytest_plugins = ["operator_fixtures"]
pytestmark = pytest.mark.cluster

NODE_SELECTOR = {CONTAINER_LABEL: "true"}
ROWS = [{"instruction": f"Say the word number {i}.", "output": f"Word {i}: kestrel."} for i in range(24)]
# Set on the trainer's containers by the node, as an air-gapped cluster's runtime config would: the
# Dockerfile leaves them to the pod, and the operator's Jobs do not set them.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# Where the pods see the tiny model (a model volume's mount path). Not its host path: that is under
# /root, which the image keeps 0700, so uid 1000 could not reach it (the first run of the trainer
# image failed so, with PermissionError on config.json).
MODEL_IN_POD = Path("/models/tiny-gemma3")


def split_image(ref: str) -> tuple[str, str]:
    repo, _, tag = ref.rpartition(":")
    return repo, tag


def built(store: ImageStore, *kinds: str) -> ImageStore:
    for kind in kinds:
        ref = store.images[kind]
        assert store.has(ref), f"the {kind} image {ref} is not built: run hack/images.sh (hack/bootstrap.sh does)"
    return store


@pytest.fixture(scope="module")
def images() -> ImageStore:
    return ImageStore.from_cache()


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    return fx.tiny_gemma()


@pytest.fixture(scope="module")
def container_node(kubeconfig, images, tiny_model):
    # The tiny model reaches the pods the way a cluster's model volume would: mounted read-only at
    # the path the spec names.
    runner = ContainerPodRunner(kubeconfig, images, extra_env=OFFLINE, harden=True,
                                extra_mounts=[Mount(str(MODEL_IN_POD), str(tiny_model), read_only=True)]).start()
    yield runner
    runner.stop()


@pytest.fixture(scope="module")
def release(helm, kubeconfig, crd, container_node, images, tmp_path_factory):  # noqa: F811
    """The chart installed in its own namespace, the operator's image running on the container node."""
    built(images, "operator")
    namespace = f"images-{secrets.token_hex(3)}"
    release = f"fto-{namespace[-6:]}"
    kubectl(kubeconfig, "create", "namespace", namespace)
    operator_repo, operator_tag = split_image(images.images["operator"])
    trainer_repo, trainer_tag = split_image(images.images["trainer"])
    values = {
        "image": {"repository": operator_repo, "tag": operator_tag, "pullPolicy": "Never"},
        "nodeSelector": NODE_SELECTOR,
        "watchNamespaces": [namespace],
        "trainer": {"image": {"repository": trainer_repo, "tag": trainer_tag, "pullPolicy": "Never"},
                    "nodeSelector": NODE_SELECTOR},
        "security": {"egress": {"allowHttp": True, "allowedHosts": ["127.0.0.1"]},
                     "localPathRoots": [f"{MODEL_IN_POD.parent}/"]},
        "extraEnv": [{"name": "FINETUNE_LIVENESS_ENDPOINT", "value": "off"},
                     {"name": "FINETUNE_METRICS_PORT", "value": "0"}],
    }
    helm_kube = [f"--kubeconfig={kubeconfig}", "--namespace", namespace]
    tmp = tmp_path_factory.mktemp("images-chart")
    try:
        adopt_crd(kubeconfig, release, namespace)
        run([helm, "install", release, str(CHART), *helm_kube, "--timeout", "3m", *values_args(tmp, values)])
        fullname = f"{release}-finetune-operator"
        deployment_available(kubeconfig, namespace, fullname)
        yield namespace, fullname
    finally:
        print("---- container node ----\n" + container_node.log_tails(6000, pods=4))
        run([helm, "uninstall", release, *helm_kube, "--wait"], check=False)
        kubectl(kubeconfig, "delete", "namespace", namespace, "--wait=false", check=False)


def pods(kubeconfig: Path, namespace: str, selector: str) -> list[dict]:
    out = kubectl(kubeconfig, "-n", namespace, "get", "pods", "-l", selector, "-o", "json").stdout
    return json.loads(out)["items"]


def process_view(pid: int) -> tuple[dict[str, str], list[str]]:
    """/proc/<pid>/status fields and mountinfo lines of a container's process, read from the host."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: v.strip() for k, v in status.items()}, Path(f"/proc/{pid}/mountinfo").read_text().splitlines()


def mount_options(mountinfo: list[str], target: str) -> str:
    """The per-mount options of the mount at `target` (the last one wins, as in the kernel)."""
    found = [line.split()[5] for line in mountinfo if line.split()[4] == target]
    assert found, f"nothing is mounted at {target}: {mountinfo}"
    return found[-1]


def test_operator_image_runs_from_the_chart_and_reconciles(kubeconfig, release, container_node):
    namespace, fullname = release
    (pod,) = pods(kubeconfig, namespace, "app.kubernetes.io/name=finetune-operator")
    assert pod["spec"]["nodeName"] == container_node.node_name
    pid = container_node.container_pid(namespace, pod["metadata"]["name"], "operator")
    assert pid, container_node.log_tails()
    status, mountinfo = process_view(pid)
    assert status["Uid"].split()[:2] == ["65532", "65532"] and status["Gid"].split()[0] == "65532"
    assert status["CapEff"] == "0000000000000000"  # the chart drops every capability
    assert "ro" in mount_options(mountinfo, "/").split(",")
    assert "rw" in mount_options(mountinfo, "/tmp").split(",")
    # In-cluster credentials from the projected ServiceAccount token (/var/run is a link to /run).
    assert "ro" in mount_options(mountinfo, "/run/secrets/kubernetes.io/serviceaccount").split(",")

    # It reconciles: a FinetuneJob becomes a Job of the trainer image. Its pod goes to a kwok node,
    # which only pretends to run it: the real run is the next test's.
    kubectl(kubeconfig, "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump({
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": "probe"},
        "spec": {"baseModel": {"uri": str(MODEL_IN_POD)}, "dataset": {"source": f"{MODEL_IN_POD}/none.jsonl"},
                 "output": {"s3": {"bucket": "probe", "endpoint": "http://127.0.0.1:9"}},
                 "resources": {"gpus": 0, "nodeSelector": {"type": "kwok"}}}}))

    def job():
        out = json.loads(kubectl(kubeconfig, "-n", namespace, "get", "jobs", "-o", "json").stdout)["items"]
        return [j for j in out if j["metadata"]["ownerReferences"][0]["name"] == "probe"]

    (created,) = wait_for(job, 120, "the operator (in its image) to create the Job")
    assert created["spec"]["template"]["spec"]["containers"][0]["image"] == images_ref(container_node, "trainer")
    kubectl(kubeconfig, "delete", "-n", namespace, "ftj", "probe", "--wait=false")
    log = container_node.log_path(namespace, pod["metadata"]["name"]).read_text(errors="replace")
    assert "Read-only file system" not in log and "Traceback" not in log, log[-4000:]


def images_ref(runner: ContainerPodRunner, kind: str) -> str:
    return runner.store.images[kind]


@pytest.mark.trainer_image
def test_finetunejob_runs_in_the_trainer_image_and_uploads_to_s3(kubeconfig, release, container_node, s3):
    built(container_node.store, "trainer")
    namespace, _ = release
    bucket = f"images-{secrets.token_hex(4)}"
    s3.client().create_bucket(Bucket=bucket)
    apply = lambda obj: kubectl(kubeconfig, "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(obj))  # noqa: E731
    apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"},
           "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}})
    apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "rows"},
           "data": {"train.jsonl": "\n".join(json.dumps(r) for r in ROWS)}})
    apply({"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": "boxed"},
           "spec": {"baseModel": {"uri": str(MODEL_IN_POD)},
                    "dataset": {"configMapRef": {"name": "rows", "key": "train.jsonl"}, "format": "alpaca"},
                    "training": {"maxSteps": 2, "batchSize": 2, "maxSeqLength": 64},
                    "export": {"gguf": ["f16"], "paritySamples": 2},
                    "output": {"s3": {"bucket": bucket, "endpoint": s3.endpoint, "forcePathStyle": True,
                                      "credentialsSecretRef": {"name": "s3"}}},
                    "resources": {"gpus": 0}}})

    def finished():
        obj = json.loads(kubectl(kubeconfig, "-n", namespace, "get", "ftj", "boxed", "-o", "json").stdout)
        phase = (obj.get("status") or {}).get("phase")
        return phase in ("Succeeded", "Failed") and obj["status"]

    status = wait_for(finished, 900, "the FinetuneJob to finish", interval=1)
    assert status["phase"] == "Succeeded", (status, container_node.log_tails(8000, pods=4))

    # The trainer's pod ran on the container node, from the trainer image.
    (pod,) = [p for p in pods(kubeconfig, namespace, "job-name") if p["metadata"]["labels"]["job-name"].startswith("boxed")]
    assert pod["spec"]["nodeName"] == container_node.node_name
    assert pod["spec"]["containers"][0]["image"] == images_ref(container_node, "trainer")
    # ...under the runtime spec runc was given: uid 1000, read-only root, emptyDirs at /workspace and /tmp.
    (config,) = container_node.dir.glob(f"pods/{namespace}_{pod['metadata']['name']}_*/containers/*/bundle/config.json")
    spec = json.loads(config.read_text())
    assert spec["process"]["user"]["uid"] == 1000 and spec["process"]["user"]["gid"] == 1000
    assert spec["root"]["readonly"] is True
    binds = {m["destination"]: m for m in spec["mounts"] if m["type"] == "bind"}
    assert {"/workspace", "/tmp", "/etc/finetune/config"} <= set(binds)
    env = dict(e.split("=", 1) for e in spec["process"]["env"])
    assert env["AWS_ACCESS_KEY_ID"] == s3.access_key  # from the Secret reference, as the kubelet resolves it
    assert env["LLAMA_CPP_CONVERTER_DIR"] == "/opt/llama.cpp"  # the image's own ENV

    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.endswith(".gguf") for k in keys), keys


def test_runc_refuses_a_root_user_when_run_as_non_root_is_set(tmp_path):
    """The container node enforces runAsNonRoot as the kubelet does (a check that can fail)."""
    from devstack.containers import ContainerSandbox
    from devstack.podspec import NotReady

    images = built(ImageStore.from_cache(), "operator")
    pod = {"metadata": {"name": "p", "namespace": "n", "uid": "0123456789"},
           "spec": {"securityContext": {"runAsNonRoot": True},
                    "containers": [{"name": "c", "image": images.images["operator"],
                                    "securityContext": {"runAsUser": 0}}]}}
    sandbox = ContainerSandbox(pod, tmp_path, kube=None, service_env={}, store=images, extra_env={},
                               extra_mounts=[], harden=True)
    with pytest.raises(NotReady, match="runAsNonRoot"):
        sandbox.launch(pod["spec"]["containers"][0])
    sandbox.close()
