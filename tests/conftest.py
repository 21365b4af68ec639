"""pytest plugin: the real local stack (hack/devstack) as lazy fixtures.

Nothing starts until a test asks for it: a test that uses no fixture below never builds or starts a
binary. Session fixtures start once and are stopped at the end of the session; a failing test gets
the log tails of the components it used (the cluster's, the S3 server's or both) appended to its report.

    cluster     LocalCluster (etcd, kube-apiserver, controller-manager, scheduler, kwok) + pod runner
    kubeconfig  path of the admin kubeconfig
    kube        kubernetes.client.ApiClient for that kubeconfig
    pod_runner  LocalPodRunner executing the pods bound to node `local-runner` (nodeSelector
                finetune.dev/local-runner=true); .log_path(ns, pod), .kill(ns, pod), and .base_env
                (env every pod process starts from) for tests that need to add to it
    namespace   a fresh namespace per test (deleted afterwards)
    s3          S3Server (SeaweedFS); s3.client() is a boto3 client
    bucket      a fresh bucket per test
"""

from __future__ import annotations

import re
import sys
import uuid
from pathlib import Path

import pytest

try:
    import devstack
except ImportError:  # not installed into the venv: use the checkout's copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hack"))
    import devstack

from devstack.procs import wait_until

CLUSTER_FIXTURES = frozenset({"cluster", "kubeconfig", "kube", "pod_runner", "namespace"})
S3_FIXTURES = frozenset({"s3", "bucket"})
_running: dict = {}  # started component -> the fixtures that reach it, for log tails in failure reports


@pytest.fixture(scope="session")
def _stack():
    cluster = devstack.LocalCluster()
    runner = None
    try:
        cluster.start()
        _running[cluster] = CLUSTER_FIXTURES
        runner = devstack.LocalPodRunner(cluster.kubeconfig).start()
        _running[runner] = CLUSTER_FIXTURES
        yield cluster, runner
    finally:
        if runner:
            runner.stop()
        cluster.stop()
        _running.pop(cluster, None)
        _running.pop(runner, None)


@pytest.fixture(scope="session")
def cluster(_stack) -> devstack.LocalCluster:
    return _stack[0]


@pytest.fixture(scope="session")
def pod_runner(_stack) -> devstack.LocalPodRunner:
    return _stack[1]


@pytest.fixture(scope="session")
def kubeconfig(cluster) -> Path:
    return cluster.kubeconfig


@pytest.fixture(scope="session")
def kube(kubeconfig):
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(kubeconfig))
    yield api
    api.close()


@pytest.fixture
def namespace(cluster, request) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{slug}-{uuid.uuid4().hex[:6]}"
    cluster.kube.post("/api/v1/namespaces", {"metadata": {"name": name, "labels": {"finetune.dev/test": "true"}}})
    # Pods are refused until the controller-manager has created the namespace's default ServiceAccount.
    wait_until(lambda: cluster.kube.get(f"/api/v1/namespaces/{name}/serviceaccounts/default"), 60,
               f"ServiceAccount {name}/default")
    yield name
    cluster.kube.delete(f"/api/v1/namespaces/{name}")


@pytest.fixture(scope="session")
def s3():
    server = devstack.S3Server()
    try:
        server.start()
        _running[server] = S3_FIXTURES
        yield server
    finally:
        server.stop()
        _running.pop(server, None)


@pytest.fixture
def bucket(s3) -> str:
    return s3.make_bucket(f"t-{uuid.uuid4().hex[:16]}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    used = set(getattr(item, "fixturenames", ()))
    tails = [c.log_tails() for c, reached_by in _running.items() if reached_by & used]
    if tails:
        report.sections.append(("devstack component logs", "\n".join(tails)))
