"""The spine, end to end: `kubectl apply` → operator → Job → real trainer (local pod runner) →
GGUF files in real S3, with the status telling the truth at every step.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import trainer_fixtures as fx
from operator_fixtures import kubectl, wait_for

pytest_plugins = ["operator_fixtures"]
pytestmark = pytest.mark.cluster

RUNNER = {"finetune.dev/local-runner": "true"}
ROWS = [{"instruction": f"Say the word number {i}.", "output": f"Word {i}: kestrel."} for i in range(24)]


def manifest(name, base, s3, bucket, **training):
    return {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": str(base)},
            "dataset": {"configMapRef": {"name": "rows", "key": "train.jsonl"}, "format": "alpaca"},
            "training": {"maxSteps": 4, "batchSize": 2, "maxSeqLength": 64, **training},
            "export": {"gguf": ["f16", "q8_0"], "paritySamples": 4},
            "output": {"s3": {"bucket": bucket, "endpoint": s3.endpoint, "forcePathStyle": True,
                              "credentialsSecretRef": {"name": "s3"}}},
            "resources": {"gpus": 0, "nodeSelector": RUNNER},
        },
    }


@pytest.fixture
def inputs(k8s, s3, namespace):
    k8s.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"},
               "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}})
    rows = "\n".join(json.dumps(r) for r in ROWS)
    k8s.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "rows"}, "data": {"train.jsonl": rows}})
    return fx.tiny_gemma()


def test_finetunejob_to_gguf_in_s3(operator, k8s, kubeconfig, namespace, s3, bucket, inputs, pod_runner):
    assert k8s.apply(manifest("spine", inputs, s3, bucket)).returncode == 0
    phases = []

    def finished():
        status = k8s.status("spine")
        if status.get("phase") and (not phases or phases[-1] != status["phase"]):
            phases.append(status["phase"])
        return status.get("phase") in ("Succeeded", "Failed") and status

    status = wait_for(finished, 600, "run to finish", interval=0.5)
    assert status["phase"] == "Succeeded", (status, pod_runner.log_tails())
    # The phases seen follow the lifecycle (polling may skip short ones, never reorder them).
    order = ["Pending", "Preparing", "Training", "Exporting", "Uploading", "Succeeded"]
    assert [p for p in order if p in phases] == phases, phases
    assert "Training" in phases
    assert kubectl(kubeconfig, "wait", "-n", namespace, "--for=condition=Succeeded", "ftj/spine",
                   "--timeout=5s").returncode == 0

    progress = status["progress"]
    assert progress["step"] == progress["totalSteps"] == 4 and progress["percent"] == 100
    assert status["metrics"]["parity"]["f16"]["top1Agreement"] >= 0.99

    # Every artifact listed in the status is in S3 with exactly the recorded size and checksum.
    client = s3.client()
    arts = {a["name"]: a for a in status["artifacts"]}
    assert any(a.get("quantization") == "q8_0" for a in arts.values())
    uid = k8s.get("ftj", "spine")["metadata"]["uid"]
    for art in arts.values():
        assert art["uri"].startswith(f"s3://{bucket}/finetune/{namespace}/spine/{uid}/run-1/")
        body = client.get_object(Bucket=bucket, Key=art["uri"].split(f"s3://{bucket}/", 1)[1])["Body"].read()
        assert len(body) == art["sizeBytes"] and hashlib.sha256(body).hexdigest() == art["sha256"], art["name"]
    manifest_doc = json.loads(client.get_object(Bucket=bucket, Key=f"finetune/{namespace}/spine/{uid}/run-1/manifest.json")
                              ["Body"].read())
    assert {a["name"] for a in manifest_doc["artifacts"]} <= set(arts) | {"manifest.json"}

    # Credentials never leak into what the operator and trainer write.
    dump = kubectl(kubeconfig, "get", "ftj,job,cm,events", "-n", namespace, "-o", "yaml").stdout
    assert s3.secret_key not in dump
    pod_logs = "".join(p.read_text(errors="replace") for p in pod_runner.dir.rglob("*.log"))
    assert "loss" in pod_logs  # the trainer's own log was captured, so the check below means something
    assert s3.secret_key not in pod_logs and s3.secret_key not in operator.log()


def test_bad_data_fails_at_once_with_the_trainers_reason(operator, k8s, namespace, s3, bucket, inputs):
    k8s.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "rows"},
               "data": {"train.jsonl": '{"instruction": "hi", "output": "there"}\n{not json\n'}})
    k8s.apply(manifest("bad", inputs, s3, bucket))
    wait_for(lambda: k8s.status("bad").get("phase") == "Failed", 300, "Failed")
    status = k8s.status("bad")
    assert status["reason"] == "InvalidDataset", status
    assert "row 2" in status["message"] or "line 2" in status["message"], status["message"]
    # podFailurePolicy: a configuration error is not retried.
    job = k8s.get("job", "bad-r1")
    assert job["status"].get("failed", 0) == 1
    assert any(e["reason"] == "Failed" and e["type"] == "Warning" for e in k8s.events("bad"))


def _running_pod(k8s, job):
    pods = (k8s.get("pods", selector=f"job-name={job}") or {}).get("items", [])
    return next((p["metadata"]["name"] for p in pods if p.get("status", {}).get("phase") == "Running"), None)


def _step_reached(k8s, name, step):
    progress = k8s.status(name).get("progress") or {}
    return progress.get("stage") == "Training" and (progress.get("step") or 0) >= step


def test_killed_trainer_resumes_from_its_checkpoint(operator, k8s, namespace, s3, bucket, inputs, pod_runner):
    """Fault drill: the trainer process is SIGKILLed mid-training (a crashed node, an OOM kill). The Job's
    retry starts a new pod on an empty disk; it resumes from the newest checkpoint in S3."""
    k8s.apply(manifest("crash", inputs, s3, bucket, maxSteps=10, checkpointEverySteps=2))
    wait_for(lambda: _step_reached(k8s, "crash", 5), 300, "training past step 5", interval=0.2)
    pod = _running_pod(k8s, "crash-r1")
    killed_at = k8s.status("crash")["progress"]["step"]
    assert pod_runner.kill(namespace, pod)
    status = wait_for(lambda: k8s.status("crash").get("phase") in ("Succeeded", "Failed") and k8s.status("crash"),
                      600, "run to finish")
    assert status["phase"] == "Succeeded", status
    assert status["progress"]["restarts"] == 1 and status["metrics"]["restarts"] == 1
    assert status["progress"]["step"] == 10
    job = k8s.get("job", "crash-r1")
    assert job["status"].get("failed") == 1 and job["status"].get("succeeded") == 1
    # The retry resumed from a checkpoint at most one interval (2 steps) behind the kill.
    pods = [p["metadata"]["name"] for p in k8s.get("pods", selector="job-name=crash-r1")["items"] if p["metadata"]["name"] != pod]
    log = pod_runner.log_path(namespace, pods[0]).read_text()
    resumed = int(re.search(r"resuming from \S+: step (\d+)", log).group(1))
    assert killed_at - 2 <= resumed < 10, (killed_at, resumed)


def test_suspend_mid_training_checkpoints_and_resumes(operator, k8s, kubeconfig, namespace, s3, bucket, inputs):
    """Suspending a running FinetuneJob deletes its pod: SIGTERM makes the trainer save a checkpoint
    and exit; resuming continues from that step instead of starting over."""
    k8s.apply(manifest("pause", inputs, s3, bucket, maxSteps=10, checkpointEverySteps=100))
    wait_for(lambda: _step_reached(k8s, "pause", 4), 300, "training past step 4", interval=0.2)
    kubectl(kubeconfig, "patch", "ftj", "pause", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    wait_for(lambda: k8s.status("pause").get("phase") == "Suspended", 120, "Suspended")
    wait_for(lambda: not (k8s.get("pods", selector="job-name=pause-r1") or {}).get("items"), 120, "pod gone")
    saved = k8s.status("pause")["progress"]["step"]
    kubectl(kubeconfig, "patch", "ftj", "pause", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    status = wait_for(lambda: k8s.status("pause").get("phase") in ("Succeeded", "Failed") and k8s.status("pause"),
                      600, "run to finish")
    assert status["phase"] == "Succeeded", status
    assert status["run"] == 1 and status["progress"]["restarts"] >= 1
    assert saved >= 4  # the SIGTERM checkpoint was at or after the step we saw


def test_unreachable_s3_fails_naming_the_endpoint_after_retries(operator, k8s, namespace, s3, bucket, inputs):
    """Fault drill: S3 permanently unreachable. The trainer retries with backoff, exits as transient,
    the Job retries it (backoffLimit), and the run ends Failed naming the endpoint — not an endless loop."""
    doc = manifest("nos3", inputs, s3, bucket)
    doc["spec"]["output"]["s3"]["endpoint"] = "http://127.0.0.1:9"  # nothing listens on the discard port
    doc["spec"]["runPolicy"] = {"backoffLimit": 1}
    k8s.apply(doc)
    status = wait_for(lambda: k8s.status("nos3").get("phase") == "Failed" and k8s.status("nos3"), 300, "Failed")
    assert status["reason"] == "StorageUnavailable", status
    assert "127.0.0.1:9" in status["message"]
    job = k8s.get("job", "nos3-r1")
    assert job["status"].get("failed") == 2  # retried once, as backoffLimit says, then given up


def test_apiserver_restart_mid_run_and_the_run_completes(operator, k8s, namespace, s3, bucket, inputs, cluster):
    """Fault drill: the apiserver goes away mid-training and comes back. The operator's watches, the
    trainer's progress reports and the Job controller reconnect; nothing is lost."""
    k8s.apply(manifest("apirs", inputs, s3, bucket, maxSteps=12))
    wait_for(lambda: _step_reached(k8s, "apirs", 3), 300, "training past step 3", interval=0.2)
    cluster.restart_apiserver()
    status = wait_for(lambda: k8s.status("apirs").get("phase") in ("Succeeded", "Failed") and k8s.status("apirs"),
                      600, "run to finish")
    assert status["phase"] == "Succeeded", status
    assert status["progress"]["step"] == 12 and status["artifacts"]
    assert len(k8s.get("jobs", selector="finetune.dev/job=apirs")["items"]) == 1


def test_operator_killed_mid_run_changes_nothing(operator, k8s, namespace, s3, bucket, inputs):
    """Fault drill: SIGKILL the operator while the trainer exports and uploads; restart it. The run
    ends exactly as an undisturbed one: one Job, Succeeded, every artifact in S3 byte for byte as the
    status lists it (size and SHA-256)."""
    import signal

    k8s.apply(manifest("opkill", inputs, s3, bucket))
    wait_for(lambda: k8s.status("opkill").get("phase") in ("Exporting", "Uploading", "Succeeded"), 300,
             "export started", interval=0.1)
    operator.stop(signal.SIGKILL)
    wait_for(lambda: (k8s.get("job", "opkill-r1") or {}).get("status", {}).get("succeeded"), 300,
             "the Job to finish without the operator")
    operator.start()
    status = wait_for(lambda: k8s.status("opkill").get("phase") == "Succeeded" and k8s.status("opkill"), 120,
                      "status converged after restart")
    assert status["run"] == 1 and len(k8s.get("jobs", selector="finetune.dev/job=opkill")["items"]) == 1
    client = s3.client()
    names = {art["name"] for art in status["artifacts"]}
    assert {"gguf/opkill-f16.gguf", "gguf/opkill-q8_0.gguf", "manifest.json"} <= names
    for art in status["artifacts"]:  # every byte as the status says: size and SHA-256
        body = client.get_object(Bucket=bucket, Key=art["uri"].split(f"s3://{bucket}/", 1)[1])["Body"].read()
        assert (len(body), hashlib.sha256(body).hexdigest()) == (art["sizeBytes"], art["sha256"]), art["name"]
    assert k8s.condition("opkill", "Succeeded")["status"] == "True"


def test_s3_outage_during_upload_is_ridden_out(operator, k8s, namespace, inputs, tmp_path, pod_runner):
    """Fault drill: the S3 server goes down while the trainer exports and comes back during the upload.
    Uploads retry with backoff and succeed; every object matches the manifest's checksum."""
    import time

    from devstack import S3Server

    private = S3Server(workdir=tmp_path / "s3").start()
    try:
        bucket = private.make_bucket("outage")
        k8s.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"},
                   "stringData": {"AWS_ACCESS_KEY_ID": private.access_key, "AWS_SECRET_ACCESS_KEY": private.secret_key}})
        k8s.apply(manifest("outage", inputs, private, bucket))
        wait_for(lambda: k8s.status("outage").get("phase") == "Exporting", 300, "Exporting", interval=0.1)
        private.stop()  # down before the upload starts
        wait_for(lambda: k8s.status("outage").get("phase") == "Uploading", 300, "Uploading", interval=0.1)
        time.sleep(3)  # the outage lasts into the upload's retries
        private.start()
        status = wait_for(lambda: k8s.status("outage").get("phase") in ("Succeeded", "Failed") and k8s.status("outage"),
                          300, "run to finish")
        assert status["phase"] == "Succeeded", status
        client = private.client()
        manifest_doc = json.loads(client.get_object(
            Bucket=bucket, Key=status["outputUri"].split(f"s3://{bucket}/", 1)[1] + "manifest.json")["Body"].read())
        for art in manifest_doc["artifacts"]:
            if art["name"] == "manifest.json":
                continue
            body = client.get_object(Bucket=bucket, Key=art["uri"].split(f"s3://{bucket}/", 1)[1])["Body"].read()
            assert hashlib.sha256(body).hexdigest() == art["sha256"], art["name"]
        # The trainer really met the outage: it retried with backoff. When a background upload (a
        # checkpoint mirror) spends its retries before S3 is back, the trainer exits retryable and
        # the Job's next pod resumes; so the retries may be in any of the Job's pods' logs.
        pods = [p["metadata"]["name"] for p in k8s.get("pods", selector="job-name=outage-r1")["items"]]
        logs = "".join(path.read_text() for path in (pod_runner.log_path(namespace, pod) for pod in pods)
                       if path.exists())
        assert "StorageUnavailable), retrying in" in logs
    finally:
        private.stop()


def test_ssrf_by_a_name_resolving_inside_is_refused_where_the_trainer_connects(
        crd, kubeconfig, namespace, k8s, s3, bucket, inputs, pod_runner, tmp_path):
    """The operator allows plain http (as an admin may) and cannot tell that 0x7f.1 is 127.0.0.1; the
    trainer, checking the address its resolver returns, refuses it: Failed EgressDenied, nothing fetched."""
    import http.server
    import threading

    from operator_fixtures import OperatorProcess

    hits = []

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"instruction": "AccessKeyId", "output": "AKIA-secret"}\n')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    s3_port = s3.endpoint.rsplit(":", 1)[1].rstrip("/")
    op = OperatorProcess(kubeconfig, namespace, tmp_path / "op.log", {
        "FINETUNE_EGRESS_ALLOW_HTTP": "true", "FINETUNE_EGRESS_ALLOWED_HOSTS": f"127.0.0.1:{s3_port}"}).start()
    try:
        doc = manifest("ssrf", inputs, s3, bucket)
        doc["spec"]["dataset"] = {"source": f"http://0x7f.1:{server.server_address[1]}/latest/meta-data/iam.jsonl"}
        assert k8s.apply(doc).returncode == 0
        wait_for(lambda: k8s.status("ssrf").get("phase") == "Failed", 300, "Failed")
        status = k8s.status("ssrf")
        assert status["reason"] == "EgressDenied" and "127.0.0.1" in status["message"], status
        assert hits == []
        assert not status.get("artifacts")
    finally:
        op.stop()
        server.shutdown()


def test_a_spec_edit_runs_on_the_warm_trainer_of_the_run_before(operator, k8s, kubeconfig, namespace, s3, bucket,
                                                               inputs, pod_runner):
    """runPolicy.keepWarmSeconds: run 1's trainer stays after its run; the edit's run 2 is handed to that
    very process through the status (no new Job, no new pod), trains on the model it kept and uploads
    under its own prefix; the status says so at every step."""
    job = manifest("warm", inputs, s3, bucket)
    job["spec"]["runPolicy"] = {"keepWarmSeconds": 300}
    assert k8s.apply(job).returncode == 0
    first = wait_for(lambda: (s := k8s.status("warm")).get("warm") and s.get("phase") in ("Succeeded", "Failed") and s,
                     600, "run 1 done and its trainer warm", interval=0.5)
    assert first["phase"] == "Succeeded" and first["run"] == 1, (first, pod_runner.log_tails())
    pod = _running_pod(k8s, "warm-r1")
    assert pod and first["warm"]["pod"] == pod and first["warm"]["run"] == 1

    job["spec"]["training"]["learningRate"] = 1e-4  # the seed's second step: only a hyperparameter
    assert k8s.apply(job).returncode == 0

    def second_done():
        s = k8s.status("warm")
        return s.get("run") == 2 and s.get("phase") in ("Succeeded", "Failed") and s
    status = wait_for(second_done, 600, "run 2 to finish", interval=0.5)
    assert status["phase"] == "Succeeded", (status, pod_runner.log_tails())
    # The same Job and the same pod ran it, with the model run 1 loaded.
    assert status["jobName"] == "warm-r1" and [j["metadata"]["name"] for j in k8s.get("jobs")["items"]] == ["warm-r1"]
    assert _running_pod(k8s, "warm-r1") == pod
    log = pod_runner.log_path(namespace, pod).read_text()
    assert "warm trainer: took run 2" in log
    assert status["metrics"]["cache"]["model"] == "kept (warm trainer)"
    assert not status.get("handoff")  # the trainer took the config out of the status
    assert status["warm"]["run"] == 2  # and waits again
    assert [h["run"] for h in status["history"]] == [1] and status["history"][0]["phase"] == "Succeeded"
    assert any(e["reason"] == "HandedOff" for e in k8s.events("warm"))
    # Run 2's own artifacts, under its own prefix, as its status lists them.
    uid = k8s.get("ftj", "warm")["metadata"]["uid"]
    client = s3.client()
    for art in status["artifacts"]:
        assert art["uri"].startswith(f"s3://{bucket}/finetune/{namespace}/warm/{uid}/run-2/"), art
        body = client.get_object(Bucket=bucket, Key=art["uri"].split(f"s3://{bucket}/", 1)[1])["Body"].read()
        assert hashlib.sha256(body).hexdigest() == art["sha256"], art["name"]
    # Deleting the FinetuneJob lets the warm pod go (its Job is garbage-collected).
    assert kubectl(kubeconfig, "delete", "ftj", "warm", "-n", namespace, "--wait=false").returncode == 0
    wait_for(lambda: not _running_pod(k8s, "warm-r1"), 120, "the warm pod to stop")
