"""The operator's lifecycle against the real local cluster (apiserver, Job controller, GC, kwok).

Training itself is not run here: pods land on a kwok node (which completes them) or stay
unschedulable, and the trainer's progress reports are made exactly as the trainer makes them —
a guarded JSON Patch sent with the trainer's own ServiceAccount identity.
"""

from __future__ import annotations

import signal
import subprocess
import time

import kubernetes
import pytest
from kubernetes.client.rest import ApiException
from operator_fixtures import kubectl, wait_for

from finetune_api import contract as c

pytest_plugins = ["operator_fixtures"]

pytestmark = pytest.mark.cluster
KWOK_CPU = {"kubernetes.io/hostname": "kwok-cpu-0"}
NOWHERE = {"finetune.dev/no-such-node": "true"}  # pods stay Pending: the run stays "active"


def ftj(name: str, node_selector=None, **spec_overrides) -> dict:
    spec = {
        "dataset": {"source": "/data/train.jsonl"},
        "training": {"maxSteps": 10},
        "output": {"s3": {"bucket": "models", "endpoint": "http://127.0.0.1:9", "forcePathStyle": True}},
        "resources": {"gpus": 0, "nodeSelector": node_selector or KWOK_CPU},
    }
    spec.update(spec_overrides)
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": name}, "spec": spec}


def jobs(k8s, name):
    return (k8s.get("jobs", selector=f"{c.LABEL_JOB}={name}") or {}).get("items", [])


def trainer_api(kubeconfig, namespace, name):
    """A client that authenticates as the job's trainer ServiceAccount (impersonation)."""
    trainer = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    trainer.configuration.api_key_prefix = {}
    trainer.default_headers["Impersonate-User"] = f"system:serviceaccount:{namespace}:{name}-trainer"
    return kubernetes.client.CustomObjectsApi(trainer)


def completion_report(run: int, output_uri: str) -> list[dict]:
    """The trainer's last patch, as Reporter.finish sends it: progress, metrics and the artifacts."""
    artifact = {"name": "manifest.json", "kind": "manifest", "uri": output_uri + "manifest.json",
                "sizeBytes": 2, "sha256": "0" * 64}
    return c.progress_patch(run, progress={"run": run, "stage": "Uploading", "percent": 100, "message": "done"},
                            metrics={"trainLoss": 1.0}, artifacts=[artifact])


def test_run_succeeds_with_conditions_events_and_kubectl_wait(operator, k8s, kubeconfig, namespace):
    assert k8s.apply(ftj("ok", runPolicy={"suspend": True})).returncode == 0
    job = wait_for(lambda: k8s.get("job", "ok-r1"), 60, "Job ok-r1")
    assert job["metadata"]["ownerReferences"][0]["kind"] == "FinetuneJob"
    cm = k8s.get("configmap", "ok-r1-config")
    uid = k8s.get("ftj", "ok")["metadata"]["uid"]
    assert f"outputUri: s3://models/finetune/{namespace}/ok/{uid}/run-1/" in cm["data"]["run.yaml"]
    assert k8s.get("serviceaccount", "ok-trainer") and k8s.get("role", "ok-trainer")
    # The trainer's completion report, then kwok runs the pod and the real Job controller completes it.
    api = trainer_api(kubeconfig, namespace, "ok")
    output = k8s.status("ok")["outputUri"]
    wait_for(lambda: _patch(api, namespace, "ok", completion_report(1, output)), 30, "trainer's Role bound")
    kubectl(kubeconfig, "patch", "ftj", "ok", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    done = kubectl(kubeconfig, "wait", "-n", namespace, "--for=condition=Succeeded", "--timeout=90s", "ftj/ok",
                   check=False)
    assert done.returncode == 0, done.stderr
    status = k8s.status("ok")
    assert status["phase"] == "Succeeded" and status["run"] == 1 and status["completionTime"]
    assert k8s.condition("ok", "Failed")["status"] == "False"
    reasons = {e["reason"] for e in wait_for(lambda: k8s.events("ok"), 30, "events")}
    assert {"JobCreated", "Succeeded"} <= reasons
    assert len(jobs(k8s, "ok")) == 1
    assert kubectl(kubeconfig, "wait", "-n", namespace, "--for=condition=Finished", "ftj/ok",
                   "--timeout=5s").returncode == 0


def test_a_job_completed_without_the_trainers_report_is_a_failure(operator, k8s, kubeconfig, namespace):
    """kwok completes pods without running anything, as a broken node or image would: no lie of success."""
    k8s.apply(ftj("hollow"))
    wait_for(lambda: k8s.status("hollow").get("phase") == "Failed", 90, "Failed")
    status = k8s.status("hollow")
    assert status["reason"] == "NoCompletionReport" and "manifest" in status["message"]
    assert k8s.condition("hollow", "Succeeded")["status"] == "False"
    done = kubectl(kubeconfig, "wait", "-n", namespace, "--for=condition=Finished", "--timeout=5s", "ftj/hollow",
                   check=False)
    assert done.returncode == 0, done.stderr


def test_trainer_progress_moves_the_phase_with_only_its_own_rbac(operator, k8s, kubeconfig, namespace):
    k8s.apply(ftj("prog", NOWHERE))
    wait_for(lambda: k8s.status("prog").get("run") == 1, 60, "run 1")
    api = trainer_api(kubeconfig, namespace, "prog")
    report = {"run": 1, "stage": "Training", "step": 3, "totalSteps": 10, "percent": 30, "loss": 2.5}
    wait_for(lambda: _patch(api, namespace, "prog", c.progress_patch(1, progress=report)), 30,
             "trainer's Role bound")
    wait_for(lambda: k8s.status("prog").get("phase") == "Training", 30, "phase Training")
    assert k8s.condition("prog", "Running")["status"] == "True"
    # A report from a stale run is refused atomically by the test operation.
    with pytest.raises(ApiException) as stale:
        _patch(api, namespace, "prog", c.progress_patch(7, progress={**report, "run": 7}))
    assert stale.value.status == 422
    assert k8s.status("prog")["progress"]["run"] == 1
    # The trainer's identity can touch nothing but its own object's status.
    k8s.apply(ftj("other", NOWHERE))
    wait_for(lambda: k8s.status("other").get("run") == 1, 60, "other run 1")
    with pytest.raises(ApiException) as denied:
        _patch(api, namespace, "other", c.progress_patch(1, progress=report))
    assert denied.value.status == 403


def _patch(api, namespace, name, ops):
    """A JSON Patch on the status subresource, sent exactly as the trainer's reporter sends it."""
    return api.api_client.call_api(
        f"/apis/finetune.dev/v1alpha1/namespaces/{namespace}/finetunejobs/{name}/status", "PATCH",
        header_params={"Content-Type": "application/json-patch+json", "Accept": "application/json"},
        body=ops, auth_settings=["BearerToken"], response_types_map={200: "object"},
        _return_http_data_only=True)


def test_missing_secret_waits_then_recovers_when_created(operator, k8s, namespace):
    spec = ftj("sec", NOWHERE)
    spec["spec"]["output"]["s3"]["credentialsSecretRef"] = {"name": "s3-creds"}
    k8s.apply(spec)
    wait_for(lambda: k8s.status("sec").get("reason") == "SecretNotFound", 60, "SecretNotFound")
    status = k8s.status("sec")
    assert status["phase"] == "Pending"  # a waiting state, not a failure that later heals
    assert k8s.condition("sec", "Finished")["status"] == "False"
    assert "spec.output.s3.credentialsSecretRef" in status["message"] and "s3-creds" in status["message"]
    assert not jobs(k8s, "sec")
    k8s.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"},
               "stringData": {"AWS_ACCESS_KEY_ID": "id-123", "AWS_SECRET_ACCESS_KEY": "topsecret-987"}})
    wait_for(lambda: k8s.get("job", "sec-r1"), 90, "Job after the Secret appears")
    wait_for(lambda: k8s.status("sec").get("phase") == "Pending", 30, "phase Pending")
    # The Secret's values never appear in the objects the operator writes.
    everything = subprocess.run(["kubectl", f"--kubeconfig={k8s.kubeconfig}", "get", "ftj,job,cm,events", "-n",
                                 namespace, "-o", "yaml"], capture_output=True, text=True).stdout
    assert "topsecret-987" not in everything and "id-123" not in everything


def test_no_bucket_and_no_default_fails_naming_the_field(operator, k8s):
    manifest = ftj("nob", NOWHERE)
    del manifest["spec"]["output"]
    assert k8s.apply(manifest).returncode == 0  # admission allows it: the operator may have a default
    wait_for(lambda: k8s.status("nob").get("phase") == "Failed", 60, "Failed")
    status = k8s.status("nob")
    assert status["reason"] == "InvalidSpec" and "spec.output.s3.bucket" in status["message"]
    assert not jobs(k8s, "nob")


def test_suspend_toggles_the_job_without_a_new_run(operator, k8s, kubeconfig, namespace):
    k8s.apply(ftj("sus", NOWHERE))
    wait_for(lambda: k8s.get("job", "sus-r1"), 60, "Job")
    kubectl(kubeconfig, "patch", "ftj", "sus", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    wait_for(lambda: k8s.get("job", "sus-r1")["spec"]["suspend"] is True, 30, "Job suspended")
    wait_for(lambda: k8s.status("sus").get("phase") == "Suspended", 30, "phase Suspended")
    assert k8s.condition("sus", "Suspended")["status"] == "True"
    kubectl(kubeconfig, "patch", "ftj", "sus", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    wait_for(lambda: k8s.get("job", "sus-r1")["spec"]["suspend"] is False, 30, "Job resumed")
    wait_for(lambda: k8s.status("sus").get("phase") == "Pending", 30, "phase back to Pending")
    assert k8s.status("sus")["run"] == 1 and len(jobs(k8s, "sus")) == 1


def test_queue_name_creates_a_suspended_job_for_kueue(operator, k8s, kubeconfig, namespace):
    k8s.apply(ftj("q", NOWHERE, runPolicy={"queueName": "gpu-queue"}))
    job = wait_for(lambda: k8s.get("job", "q-r1"), 60, "Job")
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"][c.KUEUE_QUEUE_LABEL] == "gpu-queue"
    wait_for(lambda: k8s.status("q").get("phase") == "Queued", 30, "phase Queued")
    # Kueue admits by unsuspending the Job.
    kubectl(kubeconfig, "patch", "job", "q-r1", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_for(lambda: k8s.status("q").get("phase") == "Pending", 30, "admitted → Pending")


def test_spec_edit_starts_a_new_run_and_keeps_history(operator, k8s, kubeconfig, namespace):
    k8s.apply(ftj("edit", NOWHERE))
    wait_for(lambda: k8s.get("job", "edit-r1"), 60, "Job r1")
    kubectl(kubeconfig, "patch", "ftj", "edit", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"training":{"maxSteps":null,"epochs":4,"learningRate":0.00001}}}')
    wait_for(lambda: k8s.get("job", "edit-r2"), 60, "Job r2")
    wait_for(lambda: k8s.get("job", "edit-r1") is None, 60, "old Job removed")
    status = k8s.status("edit")
    uid = k8s.get("ftj", "edit")["metadata"]["uid"]
    assert status["run"] == 2 and status["outputUri"].endswith(f"/edit/{uid}/run-2/")
    assert [h["run"] for h in status["history"]] == [1]
    assert "learningRate: 1.0e-05" in k8s.get("configmap", "edit-r2-config")["data"]["run.yaml"]
    assert status["observedGeneration"] == k8s.get("ftj", "edit")["metadata"]["generation"]


def test_an_edit_that_cannot_start_stops_the_old_run_and_says_so(operator, k8s, kubeconfig, namespace):
    """Generation 2 names a missing Secret: run 1 is stopped and kept in history, the status speaks for
    generation 2 only (no Succeeded claimed for it, no flapping), one Event; the Secret's arrival starts run 2."""
    k8s.apply(ftj("wait", NOWHERE))
    wait_for(lambda: k8s.get("job", "wait-r1"), 60, "Job r1")
    kubectl(kubeconfig, "patch", "ftj", "wait", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"output":{"s3":{"credentialsSecretRef":{"name":"late"}}}}}')
    wait_for(lambda: k8s.status("wait").get("reason") == "SecretNotFound", 60, "SecretNotFound")
    wait_for(lambda: k8s.get("job", "wait-r1") is None, 60, "run 1 stopped")
    generation = k8s.get("ftj", "wait")["metadata"]["generation"]
    seen = set()
    for _ in range(8):  # across the operator's retries the phase must hold still
        status = k8s.status("wait")
        seen.add((status["phase"], status["reason"]))
        time.sleep(1)
    assert seen == {("Pending", "SecretNotFound")}
    assert [h["run"] for h in status["history"]] == [1] and not status.get("jobName")
    for cond in status["conditions"]:
        assert cond["observedGeneration"] == generation, cond
    assert k8s.condition("wait", "Succeeded")["status"] == "False"
    assert len([e for e in k8s.events("wait") if e["reason"] == "SecretNotFound"]) == 1
    k8s.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "late"},
               "stringData": {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}})
    wait_for(lambda: k8s.get("job", "wait-r2"), 90, "run 2 once the Secret exists")
    assert k8s.status("wait")["run"] == 2


def test_recreated_with_the_same_name_it_never_meets_the_old_ones_checkpoints(operator, k8s, kubeconfig, namespace):
    k8s.apply(ftj("again", NOWHERE))
    first = wait_for(lambda: k8s.status("again").get("outputUri"), 60, "outputUri")
    kubectl(kubeconfig, "delete", "ftj", "again", "-n", namespace, "--wait=true", "--timeout=60s")
    k8s.apply(ftj("again", NOWHERE))
    second = wait_for(lambda: k8s.status("again").get("outputUri"), 60, "outputUri of the new object")
    assert first != second and k8s.get("ftj", "again")["metadata"]["uid"] in second
    assert first.rsplit("/", 3)[0] == second.rsplit("/", 3)[0]  # same <prefix>/<ns>/<name>/, another uid


def test_restart_at_any_point_never_duplicates(operator, k8s, namespace):
    # Created while the operator is down: the restarted operator creates exactly one Job.
    operator.stop(signal.SIGKILL)
    k8s.apply(ftj("rs", NOWHERE))
    operator.start()
    wait_for(lambda: k8s.get("job", "rs-r1"), 60, "Job after restart")
    for _ in range(3):  # kill it again as soon as it has started working
        seen = len(operator.log())
        operator.stop(signal.SIGKILL)
        operator.start()
        wait_for(lambda seen=seen: len(operator.log()) > seen, 30, "operator output after restart")
    wait_for(lambda: k8s.status("rs").get("phase") == "Pending", 60, "status converged")
    assert len(jobs(k8s, "rs")) == 1
    assert len((k8s.get("configmaps", selector=f"{c.LABEL_JOB}=rs") or {})["items"]) == 1
    assert k8s.status("rs")["run"] == 1


def test_delete_garbage_collects_children_and_never_hangs(operator, k8s, kubeconfig, namespace):
    k8s.apply(ftj("gone", NOWHERE))
    wait_for(lambda: k8s.get("job", "gone-r1"), 60, "Job")
    assert not (k8s.get("ftj", "gone")["metadata"].get("finalizers"))
    operator.stop()  # uninstalled operator: deletion must still complete
    kubectl(kubeconfig, "delete", "ftj", "gone", "-n", namespace, "--timeout=30s")
    wait_for(lambda: k8s.get("job", "gone-r1") is None, 60, "Job garbage-collected")
    wait_for(lambda: k8s.get("configmap", "gone-r1-config") is None, 60, "ConfigMap garbage-collected")


def test_job_failure_carries_reason(operator, k8s, kubeconfig, namespace):
    k8s.apply(ftj("dead", NOWHERE, runPolicy={"activeDeadlineSeconds": 2}))
    wait_for(lambda: k8s.status("dead").get("phase") == "Failed", 90, "Failed on deadline")
    status = k8s.status("dead")
    assert status["reason"] == "DeadlineExceeded"
    assert k8s.condition("dead", "Failed")["status"] == "True"
    assert any(e["type"] == "Warning" for e in k8s.events("dead"))


def test_metrics_endpoint_counts_jobs_by_phase(crd, kubeconfig, namespace, k8s, tmp_path):
    import socket
    import urllib.request

    from operator_fixtures import OperatorProcess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    op = OperatorProcess(kubeconfig, namespace, tmp_path / "op.log", {"FINETUNE_METRICS_PORT": str(port)}).start()
    try:
        k8s.apply(ftj("m1"))
        wait_for(lambda: k8s.status("m1").get("phase") == "Succeeded", 90, "Succeeded")

        def scrape():
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            return 'finetune_jobs{phase="Succeeded"} 1.0' in text and text

        text = wait_for(scrape, 30, "metrics")
        assert "finetune_reconcile_seconds_count" in text
        assert 'finetune_phase_transitions_total{phase="Succeeded"}' in text
        assert f'finetune_gpu_hours_total{{namespace="{namespace}"}}' in text  # gpus: 0 here, so 0.0
    finally:
        op.stop()
