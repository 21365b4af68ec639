"""The operator's side of the warm trainer (runPolicy.keepWarmSeconds) against the real local cluster.

No trainer runs here: the run's pod stays unschedulable, so its Job stays active as a warm trainer's
would, and the trainer's patches (its completion report, `status.warm`, taking the handoff) are sent
as the trainer sends them, with its own ServiceAccount's identity. The end-to-end test with the real
trainer is elsewhere.
"""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta

import kubernetes
import pytest
import yaml
from operator_fixtures import kubectl, wait_for

from finetune_api import RunConfig
from finetune_api import contract as c
from finetune_api.status import RFC3339

pytest_plugins = ["operator_fixtures"]

pytestmark = pytest.mark.cluster
NOWHERE = {"finetune.dev/no-such-node": "true"}  # the pod stays Pending: the Job stays active


def ftj(name: str, keep_warm: int = 300) -> dict:
    spec = {
        "dataset": {"source": "/data/train.jsonl"},
        "training": {"maxSteps": 10},
        "output": {"s3": {"bucket": "models", "endpoint": "http://127.0.0.1:9", "forcePathStyle": True}},
        "resources": {"gpus": 0, "nodeSelector": NOWHERE},
        "runPolicy": {"keepWarmSeconds": keep_warm},
    }
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": name}, "spec": spec}


def jobs(k8s, name):
    return [j["metadata"]["name"] for j in (k8s.get("jobs", selector=f"{c.LABEL_JOB}={name}") or {}).get("items", [])]


def trainer_patch(kubeconfig, namespace, name, ops):
    """A JSON Patch on the status subresource as the job's trainer ServiceAccount sends it."""
    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    client.configuration.api_key_prefix = {}
    client.default_headers["Impersonate-User"] = f"system:serviceaccount:{namespace}:{name}-trainer"
    try:
        return client.call_api(
            f"/apis/finetune.dev/v1alpha1/namespaces/{namespace}/finetunejobs/{name}/status", "PATCH",
            header_params={"Content-Type": "application/json-patch+json", "Accept": "application/json"},
            body=ops, auth_settings=["BearerToken"], response_types_map={200: "object"},
            _return_http_data_only=True)
    finally:
        client.close()


def completion_report(run: int, output_uri: str) -> list[dict]:
    artifact = {"name": "manifest.json", "kind": "manifest", "uri": output_uri + "manifest.json",
                "sizeBytes": 2, "sha256": "0" * 64}
    return c.progress_patch(run, progress={"run": run, "stage": "Uploading", "percent": 100, "message": "done"},
                            metrics={"trainLoss": 1.0}, artifacts=[artifact])


def warm_run_one(k8s, kubeconfig, namespace, name, left_seconds=300) -> dict:
    """Run 1 of `name` reported complete and its trainer warm: the status.warm it advertised."""
    k8s.apply(ftj(name))
    wait_for(lambda: k8s.get("job", f"{name}-r1"), 60, "Job r1")
    wait_for(lambda: (k8s.get("job", f"{name}-r1").get("status") or {}).get("active"), 60, "Job r1 active")
    output = wait_for(lambda: k8s.status(name).get("outputUri"), 60, "outputUri")
    wait_for(lambda: trainer_patch(kubeconfig, namespace, name, completion_report(1, output)), 30,
             "trainer's Role bound")
    until = (datetime.now(UTC) + timedelta(seconds=left_seconds)).strftime(RFC3339)
    warm = {c.WARM_RUN: 1, c.WARM_POD: f"{name}-r1-abcde", c.WARM_UNTIL: until}
    trainer_patch(kubeconfig, namespace, name, c.progress_patch(1, warm=warm))
    wait_for(lambda: "warm" in (k8s.status(name).get("message") or ""), 30, "Succeeded, warm")
    assert k8s.status(name)["phase"] == "Succeeded" and k8s.status(name)["completionTime"]
    return warm


def edit(kubeconfig, namespace, name, patch: str) -> None:
    kubectl(kubeconfig, "patch", "ftj", name, "-n", namespace, "--type=merge", "-p", patch)


def test_a_compatible_edit_goes_to_the_warm_trainer_without_a_new_job(operator, k8s, kubeconfig, namespace):
    warm_run_one(k8s, kubeconfig, namespace, "hot")
    edit(kubeconfig, namespace, "hot", '{"spec":{"training":{"maxSteps":null,"epochs":2,"learningRate":0.00001}}}')
    wait_for(lambda: k8s.status("hot").get("run") == 2, 60, "run 2")
    status = k8s.status("hot")
    assert status["jobName"] == "hot-r1" and status["phase"] == "Pending" and status["reason"] == "HandedOff"
    assert "warm" not in status and [h["run"] for h in status["history"]] == [1]
    assert status["history"][0]["phase"] == "Succeeded"
    assert status["observedGeneration"] == k8s.get("ftj", "hot")["metadata"]["generation"]
    handoff = status["handoff"]
    assert handoff["run"] == 2
    assert hashlib.sha256(handoff["config"].encode()).hexdigest() == handoff["configSha256"]
    config = RunConfig.model_validate(yaml.safe_load(handoff["config"]))
    uid = k8s.get("ftj", "hot")["metadata"]["uid"]
    assert (config.job.run, config.job.name, config.job.namespace, config.job.uid) == (2, "hot", namespace, uid)
    assert config.spec.training.learning_rate == 1e-5 and config.output_uri == status["outputUri"]
    assert k8s.get("configmap", "hot-r2-config")["data"]["run.yaml"] == handoff["config"]
    assert any(e["reason"] == "HandedOff" and "hot-r1-abcde" in e["message"]
               for e in wait_for(lambda: k8s.events("hot"), 30, "events"))
    for _ in range(4):  # across the operator's reactions to its own patch: still the warm Job only
        assert jobs(k8s, "hot") == ["hot-r1"]
        time.sleep(1)
    # The trainer takes run 2 and reports it: the operator follows it on the warm Job.
    trainer_patch(kubeconfig, namespace, "hot", c.take_handoff_patch(2))
    trainer_patch(kubeconfig, namespace, "hot", c.progress_patch(2, progress={"run": 2, "stage": "Training"}))
    wait_for(lambda: k8s.status("hot").get("phase") == "Training", 30, "run 2 Training")
    trainer_patch(kubeconfig, namespace, "hot", completion_report(2, status["outputUri"]))
    # Reported, its pod still up: not Succeeded until the trainer says it is warm again (or its pod ends).
    wait_for(lambda: k8s.status("hot").get("phase") == "Uploading", 30, "run 2 Uploading")
    time.sleep(1)
    assert k8s.status("hot")["phase"] == "Uploading"
    until = (datetime.now(UTC) + timedelta(seconds=300)).strftime(RFC3339)
    trainer_patch(kubeconfig, namespace, "hot", c.progress_patch(
        2, warm={c.WARM_RUN: 2, c.WARM_POD: "hot-r1-abcde", c.WARM_UNTIL: until}))
    wait_for(lambda: k8s.status("hot").get("phase") == "Succeeded", 30, "run 2 Succeeded")
    assert "handoff" not in k8s.status("hot") and jobs(k8s, "hot") == ["hot-r1"]


def test_an_edit_that_changes_the_pod_gets_a_new_job_and_stops_the_warm_one(operator, k8s, kubeconfig, namespace):
    warm_run_one(k8s, kubeconfig, namespace, "cold")
    edit(kubeconfig, namespace, "cold", '{"spec":{"resources":{"cpu":"2"}}}')
    wait_for(lambda: k8s.get("job", "cold-r2"), 60, "Job r2")
    wait_for(lambda: k8s.get("job", "cold-r1") is None, 60, "the warm Job stopped")
    status = wait_for(lambda: (s := k8s.status("cold")).get("jobName") == "cold-r2" and s, 30, "status on r2")
    assert status["run"] == 2 and "handoff" not in status and "warm" not in status
    assert [h["run"] for h in status["history"]] == [1]


def test_a_warm_trainer_about_to_leave_is_not_handed_a_run(operator, k8s, kubeconfig, namespace):
    warm_run_one(k8s, kubeconfig, namespace, "late", left_seconds=c.HANDOFF_MIN_LEFT_SECONDS - 10)
    edit(kubeconfig, namespace, "late", '{"spec":{"training":{"maxSteps":12}}}')
    wait_for(lambda: k8s.get("job", "late-r2"), 60, "Job r2")
    status = wait_for(lambda: (s := k8s.status("late")).get("jobName") == "late-r2" and s, 30, "status on r2")
    assert status["run"] == 2 and "handoff" not in status


def test_suspending_a_handed_off_run_gives_it_its_own_job(operator, k8s, kubeconfig, namespace):
    """The warm Job's pod template runs run 1: suspended and resumed, it would redo run 1. Run 2 moves to
    its own Job instead (suspended), and the warm Job goes."""
    warm_run_one(k8s, kubeconfig, namespace, "pause")
    edit(kubeconfig, namespace, "pause", '{"spec":{"training":{"maxSteps":12}}}')
    wait_for(lambda: k8s.status("pause").get("run") == 2, 60, "run 2 handed off")
    assert k8s.status("pause")["jobName"] == "pause-r1"
    edit(kubeconfig, namespace, "pause", '{"spec":{"runPolicy":{"suspend":true}}}')
    job = wait_for(lambda: k8s.get("job", "pause-r2"), 60, "run 2's own Job")
    assert job["spec"]["suspend"] is True
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    config = k8s.get("configmap", "pause-r2-config")["data"]["run.yaml"]
    assert env[c.ENV_RUN] == "2" and env[c.ENV_CONFIG_SHA256] == hashlib.sha256(config.encode()).hexdigest()
    wait_for(lambda: k8s.get("job", "pause-r1") is None, 60, "the warm Job stopped")
    wait_for(lambda: k8s.status("pause").get("phase") == "Suspended", 30, "run 2 Suspended")
    status = k8s.status("pause")
    assert status["run"] == 2 and status["jobName"] == "pause-r2" and "handoff" not in status
    assert not [e for e in k8s.events("pause") if e["reason"] == "Failed"]  # the warm Job's deletion is no failure
