"""The admin's policy as pure functions: what a spec may reach, read and ask of the pod spec; and the
trainer's connect-time egress guard on real sockets (loopback only)."""

from __future__ import annotations

import http.server
import os
import socket
import threading
import urllib.error
import urllib.request

import pytest

from finetune_api.egress import EgressPolicy, denied_address, host_allowed, local_path_problem, url_problem
from finetune_api.spec import FinetuneJobSpec
from finetune_operator import builders, policy
from finetune_operator.config import OperatorConfig, image_repository
from finetune_trainer.errors import ConfigError
from finetune_trainer.storage import egress_guard

STRICT = EgressPolicy()
BASE = {"dataset": {"source": "yahma/alpaca-cleaned"}, "output": {"s3": {"bucket": "models"}}}
CFG = OperatorConfig(trainer_image="ghcr.io/finetune-operator/trainer:0.1.0", default_s3_bucket="models",
                     default_s3_endpoint="http://seaweedfs.storage.svc:8333",
                     default_tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])


@pytest.mark.parametrize("address", ["169.254.169.254", "fd00:ec2::254", "127.0.0.1", "::1", "10.0.0.1",
                                     "172.16.5.4", "192.168.0.1", "100.64.0.1", "0.0.0.0", "::ffff:169.254.169.254",
                                     "224.0.0.1", "fe80::1", "240.0.0.1", "not-an-ip"])
def test_internal_addresses_are_denied(address):
    assert denied_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700:4700::1111", "151.101.1.69"])
def test_public_addresses_are_not(address):
    assert not denied_address(address)


@pytest.mark.parametrize("url, fragment", [
    ("http://example.com/d.jsonl", "plain http"),
    ("https://169.254.169.254/latest/meta-data/", "internal address"),
    ("https://[fd00:ec2::254]/latest/", "internal address"),
    ("https://10.0.0.1/x", "internal address"),
    ("https://[::ffff:127.0.0.1]/x", "internal address"),
    ("https://localhost:8080/x", "internal name"),
    ("https://kubernetes.default.svc/api", "internal name"),
    ("https://minio.storage.svc.cluster.local:9000/", "internal name"),
    ("https://metadata.google.internal/computeMetadata/v1/", "internal name"),
    ("https://intranet/x", "internal name"),
    ("https://user:pw@example.com/x", "credentials"),
    ("ftp://example.com/x", "scheme"),
])
def test_url_problems(url, fragment):
    assert fragment in (url_problem(STRICT, url) or "")


def test_allowed_hosts_open_internal_stores_by_name_and_port():
    allow = EgressPolicy(allowed_hosts=["minio.storage.svc:9000", "10.1.2.3"])
    assert url_problem(allow, "http://minio.storage.svc:9000/bucket") is None
    assert url_problem(allow, "http://minio.storage.svc:9001/bucket")  # another port is another service
    assert url_problem(allow, "https://10.1.2.3:443/x") is None
    assert url_problem(STRICT, "https://huggingface.co/datasets/x/resolve/main/d.jsonl") is None
    assert host_allowed(allow, "MINIO.storage.svc.", 9000)


def test_local_paths_must_be_under_a_root_as_written():
    assert local_path_problem(STRICT, "/data/train.jsonl") is None
    assert "not under" in local_path_problem(STRICT, "/tmp/train.jsonl")
    assert local_path_problem(STRICT, "/data/../etc/passwd")
    assert local_path_problem(STRICT, "/database/x")  # a root is a folder, not a string prefix


def spec(**over) -> FinetuneJobSpec:
    raw = {**BASE, **over}
    return builders.resolve_spec(raw, CFG)


@pytest.mark.parametrize("over, field", [
    ({"dataset": {"source": "https://169.254.169.254/latest/meta-data/iam/x"}}, "spec.dataset.source"),
    ({"dataset": {"source": "/home/me/data.jsonl"}}, "spec.dataset.source"),
    ({"baseModel": {"uri": "/srv/models/x"}}, "spec.baseModel.uri"),
    ({"evaluation": {"tasks": ["piqa"], "dataUri": "/opt/tasks"}}, "spec.evaluation.dataUri"),
    ({"output": {"s3": {"bucket": "models", "endpoint": "http://10.0.0.5:9000"}}}, "spec.output.s3.endpoint"),
    ({"resources": {"image": "docker.io/evil/miner:latest"}}, "spec.resources.image"),
    ({"resources": {"image": "ghcr.io/finetune-operator/trainer-evil:1"}}, "spec.resources.image"),
    ({"resources": {"gpus": 1, "gpuResourceName": "example.com/fpga"}}, "spec.resources.gpuResourceName"),
    ({"resources": {"priorityClassName": "high"}}, "spec.resources.priorityClassName"),
    ({"resources": {"tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]}},
     "spec.resources.tolerations[0]"),
    ({"resources": {"serviceAccountName": "default"}}, "spec.resources.serviceAccountName"),
])
def test_policy_names_the_field(over, field):
    problems = policy.violations(spec(**over), CFG)
    assert any(p.startswith(field + ":") for p in problems), problems


def test_what_the_admin_configured_passes():
    ok = spec(resources={"image": "ghcr.io/finetune-operator/trainer:0.2.0",
                         "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]})
    assert policy.violations(ok, CFG) == []
    # the default S3 endpoint is the admin's own: reachable over http at its in-cluster name
    assert policy.violations(spec(output={"s3": {"endpoint": "http://seaweedfs.storage.svc:8333"}}), CFG) == []
    wide = OperatorConfig(**{**CFG.__dict__, "allowed_images": ("registry.example.com/ml/",),
                             "allowed_priority_classes": ("batch-low",),
                             "allow_service_account_override": True})
    assert policy.violations(spec(resources={"image": "registry.example.com/ml/trainer@sha256:" + "a" * 64,
                                             "priorityClassName": "batch-low", "serviceAccountName": "ml"}),
                             wide) == []


def test_image_repository_ignores_tag_digest_and_keeps_a_registry_port():
    assert image_repository("reg:5000/ml/trainer:1.0@sha256:" + "b" * 64) == "reg:5000/ml/trainer"
    assert image_repository("trainer") == "trainer"


# ----------------------------------------------------------------------------- trainer, connect time


@pytest.fixture
def http_server():
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"instruction": "a", "output": "b"}\n')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], hits
    server.shutdown()


@pytest.fixture
def guard():
    yield egress_guard
    egress_guard.uninstall()
    egress_guard.last_denial = None


def test_guard_refuses_a_name_that_resolves_inside(http_server, guard):
    """0x7f.1 is 127.0.0.1 to the resolver but no IP literal to a URL check: only the connect-time
    check on the resolved address can catch it (as it catches DNS rebinding)."""
    port, hits = http_server
    url = f"http://0x7f.1:{port}/latest/meta-data.jsonl"
    assert url_problem(EgressPolicy(allow_http=True), url) is None  # the operator cannot tell
    guard.install(EgressPolicy(allow_http=True))
    with pytest.raises(urllib.error.URLError) as exc:
        urllib.request.urlopen(url, timeout=5)
    assert isinstance(exc.value.reason, egress_guard.EgressDenied)
    assert "127.0.0.1" in guard.last_denial and hits == []


def test_guard_lets_allowed_hosts_and_the_apiserver_through(http_server, guard, monkeypatch):
    port, hits = http_server
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(port))
    guard.install(EgressPolicy())
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5).status == 200
    assert hits == ["/status"]
    with pytest.raises(OSError):
        socket.getaddrinfo("127.0.0.1", port + 1)


def test_local_path_is_checked_after_resolving_links(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "ok.jsonl").write_text("{}\n")
    os.symlink("/etc", root / "escape")
    rules = EgressPolicy(local_path_roots=[f"{root}/"])
    egress_guard.check_local_path(rules, "spec.dataset.source", str(root / "ok.jsonl"))
    with pytest.raises(ConfigError) as exc:
        egress_guard.check_local_path(rules, "spec.dataset.source", str(root / "escape" / "passwd"))
    assert exc.value.reason == "PathNotAllowed" and "/etc/passwd" in exc.value.message
    with pytest.raises(ConfigError):
        egress_guard.check_local_path(rules, "spec.baseModel.uri", "/srv/model")


@pytest.fixture
def s3_keys(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")


def _internal_s3(port: int):
    from finetune_api.spec import S3Spec

    return S3Spec(bucket="models", endpoint=f"http://0x7f.1:{port}", force_path_style=True)


def _check_output_bucket(s3, tmp_path):
    from finetune_trainer.storage.s3 import S3Store

    S3Store(s3).check_access("s3://models/out/")


def _resolve_base_model(s3, tmp_path):
    from finetune_api.spec import BaseModelSpec
    from finetune_trainer.train import model_loading

    model_loading.resolve(BaseModelSpec(uri="s3://models/base/tiny"), tmp_path, s3)


def _resolve_eval_tasks(s3, tmp_path):
    from finetune_trainer.evaluation.data import resolve_task_dir
    from finetune_trainer.storage.s3 import S3Store

    resolve_task_dir("s3://models/eval-tasks/", tmp_path, S3Store(s3))


@pytest.mark.parametrize("reach", [_check_output_bucket, _resolve_base_model, _resolve_eval_tasks],
                         ids=["output-bucket", "s3-base-model", "s3-eval-data"])
def test_guard_refuses_an_s3_endpoint_that_resolves_inside(http_server, guard, s3_keys, tmp_path, reach):
    """An S3 endpoint the operator could not judge, whatever reads through it (the output bucket, an
    s3:// base model, s3:// eval data): refused where it resolves, at once (no retries), typed as the
    trainer's EgressDenied; the server never sees a request."""
    port, hits = http_server
    guard.install(EgressPolicy(allow_http=True))
    with pytest.raises(ConfigError) as exc:
        reach(_internal_s3(port), tmp_path)
    assert exc.value.reason == "EgressDenied" and "127.0.0.1" in exc.value.message
    assert hits == []
