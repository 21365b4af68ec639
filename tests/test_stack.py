"""The local stack is real: Jobs run through the real Job controller and garbage collector, pods on
`local-runner` run as processes with their env and volumes, and kwok fakes the GPU node."""

from __future__ import annotations

import json
import sys

import pytest
from kubernetes import client

from devstack.cluster import GPU_LABEL, GPU_NODE
from devstack.node import NODE_LABEL, NODE_NAME
from devstack.procs import wait_until

pytestmark = pytest.mark.cluster


def job(name: str, code: str, env: list[dict] | None = None, **spec) -> dict:
    """A Job running `python -c code` on the local runner, never retried."""
    container = {"name": "main", "image": "python:3.11", "command": ["python", "-c", code], "env": env or []}
    pod_spec = {"restartPolicy": "Never", "nodeSelector": {NODE_LABEL: "true"}, "containers": [container], **spec}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": 0, "template": {"spec": pod_spec}}}


def job_condition(batch: client.BatchV1Api, namespace: str, name: str) -> str | None:
    conditions = batch.read_namespaced_job_status(name, namespace).status.conditions or []
    return next((c.type for c in conditions if c.type in ("Complete", "Failed") and c.status == "True"), None)


def job_pods(core: client.CoreV1Api, namespace: str, name: str) -> list[client.V1Pod]:
    return core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items


def finished_pod(core: client.CoreV1Api, namespace: str, name: str) -> client.V1Pod | None:
    pod = core.read_namespaced_pod(name, namespace)
    return pod if pod.status.phase in ("Succeeded", "Failed") else None


def test_job_runs_a_real_process_on_the_local_runner(kube, namespace, tmp_path):
    batch, core = client.BatchV1Api(kube), client.CoreV1Api(kube)
    out = tmp_path / "out.txt"
    code = "import os, pathlib, sys; pathlib.Path(os.environ['OUT']).write_text(os.environ['POD'] + ' ' + sys.prefix)"
    env = [{"name": "OUT", "value": str(out)},
           {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    batch.create_namespaced_job(namespace, job("hello", code, env))

    assert wait_until(lambda: job_condition(batch, namespace, "hello"), 120, "the Job to finish") == "Complete"
    [pod] = job_pods(core, namespace, "hello")
    assert pod.spec.node_name == NODE_NAME
    assert pod.status.phase == "Succeeded"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0
    # The process really ran, with its own pod name and this project's venv as `python`.
    assert out.read_text() == f"{pod.metadata.name} {sys.prefix}"


def test_failed_job_reports_exit_code_and_termination_message(kube, namespace):
    batch, core = client.BatchV1Api(kube), client.CoreV1Api(kube)
    code = "open('/dev/termination-log', 'w').write('boom: bad config'); raise SystemExit(3)"
    batch.create_namespaced_job(namespace, job("fails", code))

    assert wait_until(lambda: job_condition(batch, namespace, "fails"), 120, "the Job to finish") == "Failed"
    [pod] = job_pods(core, namespace, "fails")
    assert pod.status.phase == "Failed"
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason, terminated.message) == (3, "Error", "boom: bad config")


def test_deleting_a_job_garbage_collects_its_pods_and_stops_the_process(kube, namespace, tmp_path):
    batch, core = client.BatchV1Api(kube), client.CoreV1Api(kube)
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    batch.create_namespaced_job(namespace, job("sleeper", code, terminationGracePeriodSeconds=5))
    wait_until(lambda: [p for p in job_pods(core, namespace, "sleeper") if p.status.phase == "Running"], 120,
               "the Job's pod to run")
    pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), 30, "the process to start"))

    batch.delete_namespaced_job("sleeper", namespace, propagation_policy="Background")
    wait_until(lambda: not job_pods(core, namespace, "sleeper"), 120, "the garbage collector to delete the pod")
    wait_until(lambda: not _alive(pid), 30, "the pod's process to exit")


def test_gpu_pod_is_scheduled_onto_the_kwok_gpu_node(kube, namespace):
    core = client.CoreV1Api(kube)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gpu"},
           "spec": {"nodeSelector": {GPU_LABEL: "true"},
                    "containers": [{"name": "main", "image": "trainer",
                                    "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}
    core.create_namespaced_pod(namespace, pod)
    running = wait_until(lambda: (p := core.read_namespaced_pod("gpu", namespace)).status.phase == "Running" and p,
                         60, "kwok to run the GPU pod")
    assert running.spec.node_name == GPU_NODE


def test_secret_env_configmap_volume_and_service_account_reach_the_process(kube, namespace, tmp_path):
    core = client.CoreV1Api(kube)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "creds"}, "stringData": {"token": "s3cr3t"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "cfg"}, "data": {"config.yaml": "lr: 0.001\n"}})
    out = tmp_path / "out"
    # Reads the mounted config, the secret env var, and calls the apiserver in-cluster style with the
    # projected service-account token and CA, asking who it is.
    code = """
import json, os, ssl, sys, urllib.request
sa = os.environ["FINETUNE_SERVICEACCOUNT_DIR"]
host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
req = urllib.request.Request(f"https://{host}:{port}/apis/authentication.k8s.io/v1/selfsubjectreviews",
    method="POST", data=json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode(),
    headers={"Authorization": "Bearer " + open(sa + "/token").read(), "Content-Type": "application/json"})
ctx = ssl.create_default_context(cafile=sa + "/ca.crt")
who = json.load(urllib.request.urlopen(req, context=ctx))["status"]["userInfo"]["username"]
result = {"config": open(sys.argv[1]).read(), "token": os.environ["TOKEN"], "cfg_env": os.environ["CFG"],
          "namespace": open(sa + "/namespace").read(), "user": who}
open(os.environ["OUT"], "w").write(json.dumps(result))
"""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "reader"},
           "spec": {"restartPolicy": "Never", "nodeSelector": {NODE_LABEL: "true"},
                    "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}],
                    "containers": [{"name": "main", "image": "trainer", "command": ["python", "-c", code],
                                    "args": ["/etc/finetune/config.yaml"],
                                    "volumeMounts": [{"name": "cfg", "mountPath": "/etc/finetune"}],
                                    "env": [{"name": "OUT", "value": str(out)},
                                            {"name": "CFG", "value": "/etc/finetune/config.yaml"},
                                            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds",
                                                                                             "key": "token"}}}]}]}}
    core.create_namespaced_pod(namespace, pod)
    finished = wait_until(lambda: finished_pod(core, namespace, "reader"), 120, "the pod to finish")
    assert finished.status.phase == "Succeeded", finished.status
    result = json.loads(out.read_text())
    assert result["config"] == "lr: 0.001\n"
    assert result["token"] == "s3cr3t"
    assert result["cfg_env"] != "/etc/finetune/config.yaml" and result["cfg_env"].endswith("/config.yaml")
    assert result["namespace"] == namespace
    assert result["user"] == f"system:serviceaccount:{namespace}:default"


def _alive(pid: int) -> bool:
    # A zombie (exited, not yet reaped by the runner) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
