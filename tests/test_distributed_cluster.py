"""Two training pods through the operator: `resources.nodes: 2` → an Indexed Job and a headless Service,
torchrun's c10d rendezvous on pod 0 (the dev pod runner maps the Service's names to this host), one
gloo process per pod on CPU. Rank 1 is killed mid-run; the Job's retry restarts both pods, which resume
from the S3 checkpoint, and the run ends with the loss curve and the adapter of a one-process run with
the same global batch. (The GGUF export of the same weights is compared in test_trainer_distributed.py;
here it would only add minutes of conversion on CPU.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import trainer_fixtures as fx
from operator_fixtures import kubectl, wait_for

pytest_plugins = ["operator_fixtures"]
pytestmark = pytest.mark.cluster

RUNNER = {"finetune.dev/local-runner": "true"}
ROWS = [{"instruction": f"Say the word number {i}.", "output": f"Word {i}: kestrel."} for i in range(24)]
STEPS = 8


def manifest(name, base, s3, bucket, nodes):
    return {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": str(base)},
            "dataset": {"configMapRef": {"name": "rows", "key": "train.jsonl"}, "format": "alpaca"},
            "training": {"maxSteps": STEPS, "batchSize": 2, "gradientAccumulationSteps": 2, "maxSeqLength": 64,
                         "learningRate": 5e-3, "checkpointEverySteps": 2},
            "export": {"gguf": [], "adapter": True},
            "output": {"s3": {"bucket": bucket, "endpoint": s3.endpoint, "forcePathStyle": True,
                              "credentialsSecretRef": {"name": "s3"}}},
            "resources": {"gpus": 0, "nodes": nodes, "nodeSelector": RUNNER},
        },
    }


@pytest.fixture
def inputs(k8s, s3):
    k8s.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"},
               "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}})
    rows = "\n".join(json.dumps(r) for r in ROWS)
    k8s.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "rows"}, "data": {"train.jsonl": rows}})
    return fx.tiny_gemma()


def finished(k8s, name):
    status = k8s.status(name)
    return status.get("phase") in ("Succeeded", "Failed") and status


def final_state(s3, bucket, status) -> dict:
    prefix = status["outputUri"].removeprefix(f"s3://{bucket}/")
    body = s3.client().get_object(Bucket=bucket, Key=f"{prefix}checkpoints/step-{STEPS:08d}/state.json")["Body"]
    return json.loads(body.read())


def adapter_tensors(s3, bucket, status, tmp_path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    uri = next(a["uri"] for a in status["artifacts"] if a["kind"] == "adapter" and a["uri"].endswith(".safetensors"))
    path = tmp_path / f"{status['outputUri'].rstrip('/').split('/')[-3]}.safetensors"
    s3.client().download_file(bucket, uri.removeprefix(f"s3://{bucket}/"), str(path))
    return load_file(str(path))


def rank_one_pod(k8s, pod_runner, namespace, job):
    """The running pod whose process is rank 1 (c10d, not the pod index, decides the ranks)."""
    for pod in (k8s.get("pods", selector=f"job-name={job}") or {}).get("items", []):
        log = pod_runner.log_path(namespace, pod["metadata"]["name"])
        if pod["status"].get("phase") == "Running" and log.exists() and "rank 1 of 2" in log.read_text(errors="replace"):
            return pod["metadata"]["name"]
    return None


def test_two_pods_train_like_one_and_resume_after_rank_one_dies(operator, k8s, kubeconfig, namespace, s3, bucket,
                                                                 inputs, pod_runner, tmp_path):
    assert k8s.apply(manifest("one", inputs, s3, bucket, nodes=1)).returncode == 0
    assert k8s.apply(manifest("two", inputs, s3, bucket, nodes=2)).returncode == 0

    job = wait_for(lambda: k8s.get("job", "two-r1"), 60, "Job two-r1")
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    service = k8s.get("service", "two-r1")
    assert service["spec"]["clusterIP"] == "None"
    assert k8s.status("two")["worldSize"] == 2
    assert "GPUS" in kubectl(kubeconfig, "get", "ftj", "-n", namespace).stdout.splitlines()[0]

    # Rank 1 dies mid-training, after a checkpoint (every 2 steps).
    def past_step_three():
        progress = k8s.status("two").get("progress") or {}
        return progress.get("stage") == "Training" and (progress.get("step") or 0) >= 3
    wait_for(past_step_three, 420, "training past step 3", interval=0.2)
    victim = wait_for(lambda: rank_one_pod(k8s, pod_runner, namespace, "two-r1"), 30, "rank 1's pod")
    assert pod_runner.kill(namespace, victim)

    two = wait_for(lambda: finished(k8s, "two"), 600, "two to finish", interval=0.5)
    assert two["phase"] == "Succeeded", (two, pod_runner.log_tails(pods=4))
    one = wait_for(lambda: finished(k8s, "one"), 300, "one to finish", interval=0.5)
    assert one["phase"] == "Succeeded", (one, pod_runner.log_tails(pods=4))

    # The retry resumed from the checkpoint instead of starting over.
    assert two["progress"]["restarts"] >= 1 and two["metrics"]["restarts"] >= 1
    assert two["progress"]["step"] == STEPS
    assert (k8s.get("job", "two-r1")["status"].get("failed") or 0) >= 1
    logs = "".join(pod_runner.log_path(namespace, p["metadata"]["name"]).read_text(errors="replace")
                   for p in k8s.get("pods", selector="job-name=two-r1")["items"])
    assert "resuming from step-" in logs

    # Same global batch, same curve (the resumed steps included), same trained weights.
    curve_one, curve_two = final_state(s3, bucket, one)["losses"], final_state(s3, bucket, two)["losses"]
    assert len(curve_two) == STEPS and curve_one[-1] < curve_one[0]
    np.testing.assert_allclose(curve_two, curve_one, rtol=1e-4)
    assert two["metrics"]["tokens"] == one["metrics"]["tokens"]
    a, b = adapter_tensors(s3, bucket, one, tmp_path), adapter_tensors(s3, bucket, two, tmp_path)
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=name)
