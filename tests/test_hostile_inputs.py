"""Hostile and careless FinetuneJobs against the real stack, the operator running with the chart's
env and its ServiceAccount's token (the chart's RBAC, not the test's admin rights).

Every case has its expected outcome, one of:
- ADMISSION: the apiserver refuses it (schema or CEL) and the error names the field;
- OPERATOR: admission lets it through (only this cluster's policy, or only the apiserver's Job
  validation, can tell), and the operator ends it Failed with a reason and the field named, before
  creating anything: no Job, ConfigMap, ServiceAccount, Role or RoleBinding, and one Warning Event.
The trainer's own first-seconds checks are in test_trainer_errors.py (unknown eval task, LoRA
targets the model lacks, a run config changed after its Job was made, connect-time egress for a
dataset, an S3 endpoint, an s3:// model and eval data) and test_policy.py (the egress rule itself);
test_e2e.py runs the connect-time refusal end to end.
Below the table: children the operator did not make are never taken over (ChildNotOwned), a child the
apiserver refuses fails the run and leaves nothing (ChildRejected), and a spec-named ServiceAccount
(where the chart allows one) is never bound to the operator's Role.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_fixtures import ROOT, kubectl, wait_for

from devstack import binaries

pytest_plugins = ["operator_fixtures"]
pytestmark = pytest.mark.cluster

NOWHERE = {"finetune.dev/no-such-node": "true"}  # nothing here ever runs: only the operator is judged
CHILD_KINDS = ("jobs.batch", "configmaps", "serviceaccounts", "roles", "rolebindings")


def base_spec() -> dict[str, Any]:
    return {"baseModel": {"name": "tiny/model"}, "dataset": {"source": "tiny/data"}, "training": {"maxSteps": 1},
            "resources": {"gpus": 0, "nodeSelector": dict(NOWHERE)}, "output": {"s3": {"bucket": "models"}}}


def at(path: str, value: Any) -> Callable[[dict], None]:
    """A mutation setting spec.<path> (dotted)."""
    def apply(spec: dict) -> None:
        *parents, last = path.split(".")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return apply


def both(*mutations: Callable[[dict], None]) -> Callable[[dict], None]:
    def apply(spec: dict) -> None:
        for m in mutations:
            m(spec)
    return apply


def manifest(name: str, mutate: Callable[[dict], None] | None) -> dict[str, Any]:
    spec = base_spec()
    if mutate:
        mutate(spec)
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": name}, "spec": spec}


IMDS = "169.254.169.254"
# (id, mutation, the field the error must name)
ADMISSION: list[tuple[str, Callable[[dict], None], str]] = [
    # server-side request forgery and credentials in URLs
    ("dataset url with credentials", at("dataset.source", "https://user:pw@example.com/d.jsonl"), "spec.dataset.source"),
    ("dataset file url", at("dataset.source", "file:///etc/passwd"), "spec.dataset.source"),
    ("dataset gopher url", at("dataset.source", "gopher://127.0.0.1:25/x"), "spec.dataset.source"),
    ("dataset ftp url", at("dataset.source", "ftp://example.com/d.jsonl"), "spec.dataset.source"),
    ("dataset url with a space", at("dataset.source", "https://example.com/a b.jsonl"), "spec.dataset.source"),
    ("dataset etc passwd", at("dataset.source", "/etc/passwd"), "spec.dataset.source"),
    ("dataset proc environ", at("dataset.source", "/proc/self/environ"), "spec.dataset.source"),
    ("dataset service account token", at("dataset.source", "/var/run/secrets/kubernetes.io/serviceaccount/token"),
     "spec.dataset.source"),
    ("dataset run secrets", at("dataset.source", "/run/secrets/x"), "spec.dataset.source"),
    ("dataset dot-dot", at("dataset.source", "/data/../etc/shadow"), "spec.dataset.source"),
    ("dataset empty segment", at("dataset.source", "/data//train.jsonl"), "spec.dataset.source"),
    ("dataset dot segment", at("dataset.source", "/data/./train.jsonl"), "spec.dataset.source"),
    ("dataset boot", at("dataset.source", "/boot/vmlinuz"), "spec.dataset.source"),
    ("dataset host mount", at("dataset.source", "/host/etc/kubernetes/admin.conf"), "spec.dataset.source"),
    ("dataset kubelet dir", at("dataset.source", "/var/lib/kubelet/pki/kubelet.key"), "spec.dataset.source"),
    ("s3 endpoint with credentials", at("output.s3.endpoint", "http://ak:sk@minio:9000"), "spec.output.s3.endpoint"),
    ("s3 endpoint file url", at("output.s3.endpoint", "file:///tmp"), "spec.output.s3.endpoint"),
    ("s3 endpoint ftp", at("output.s3.endpoint", "ftp://s3.example.com"), "spec.output.s3.endpoint"),
    ("s3 endpoint query", at("output.s3.endpoint", "https://s3.example.com?x=1"), "spec.output.s3.endpoint"),
    ("s3 endpoint no scheme", at("output.s3.endpoint", "minio:9000"), "spec.output.s3.endpoint"),
    ("model uri etc", both(at("baseModel", {}), at("baseModel.uri", "/etc/passwd")), "spec.baseModel.uri"),
    ("model uri usr", both(at("baseModel", {}), at("baseModel.uri", "/usr/lib/x")), "spec.baseModel.uri"),
    ("model uri https", both(at("baseModel", {}), at("baseModel.uri", f"https://{IMDS}/m")), "spec.baseModel.uri"),
    ("model uri s3 userinfo", both(at("baseModel", {}), at("baseModel.uri", "s3://ak@bucket/m")), "spec.baseModel.uri"),
    ("model uri traversal", both(at("baseModel", {}), at("baseModel.uri", "/models/../../etc")), "spec.baseModel.uri"),
    ("model uri sys", both(at("baseModel", {}), at("baseModel.uri", "/sys/class")), "spec.baseModel.uri"),
    ("model name traversal", at("baseModel.name", "../../etc/passwd"), "spec.baseModel.name"),
    ("model revision injection", at("baseModel.revision", "main; rm -rf /"), "spec.baseModel.revision"),
    ("eval data etc", at("evaluation", {"tasks": ["piqa"], "dataUri": "/etc"}), "spec.evaluation.dataUri"),
    ("eval data metadata url", at("evaluation", {"tasks": ["piqa"], "dataUri": f"http://{IMDS}/"}),
     "spec.evaluation.dataUri"),
    ("eval data dev", at("evaluation", {"tasks": ["piqa"], "dataUri": "/dev/shm/x"}), "spec.evaluation.dataUri"),
    # path traversal in the S3 prefix
    ("prefix parent", at("output.s3.prefix", "../other-tenant"), "spec.output.s3.prefix"),
    ("prefix absolute", at("output.s3.prefix", "/finetune"), "spec.output.s3.prefix"),
    ("prefix empty segment", at("output.s3.prefix", "a//b"), "spec.output.s3.prefix"),
    ("prefix dot segment", at("output.s3.prefix", "a/./b"), "spec.output.s3.prefix"),
    ("prefix trailing parent", at("output.s3.prefix", "team/.."), "spec.output.s3.prefix"),
    ("prefix with space", at("output.s3.prefix", "a b"), "spec.output.s3.prefix"),
    ("bucket with a path", at("output.s3.bucket", "models/../x"), "spec.output.s3.bucket"),
    # privilege escalation through the pod spec: what is wrong on any cluster
    ("image with a space", at("resources.image", "evil image:latest"), "spec.resources.image"),
    ("image upper case", at("resources.image", "Evil/Image"), "spec.resources.image"),
    ("image with a semicolon", at("resources.image", "ghcr.io/x/trainer:1;rm"), "spec.resources.image"),
    ("system priority class", at("resources.priorityClassName", "system-cluster-critical"),
     "spec.resources.priorityClassName"),
    ("system node priority class", at("resources.priorityClassName", "system-node-critical"),
     "spec.resources.priorityClassName"),
    ("toleration of every taint", at("resources.tolerations", [{"operator": "Exists"}]),
     "spec.resources.tolerations[0].key"),
    ("toleration empty key", at("resources.tolerations", [{"key": "", "operator": "Exists"}]),
     "spec.resources.tolerations[0].key"),
    ("toleration bad effect", at("resources.tolerations", [{"key": "a", "effect": "NoEverything"}]),
     "spec.resources.tolerations[0].effect"),
    ("toleration bad operator", at("resources.tolerations", [{"key": "a", "operator": "Gt"}]),
     "spec.resources.tolerations[0].operator"),
    ("toleration unknown field", at("resources.tolerations", [{"key": "a", "tolerateAll": True}]), "tolerateAll"),
    ("too many tolerations", at("resources.tolerations", [{"key": f"k{i}"} for i in range(17)]),
     "spec.resources.tolerations"),
    ("node selector long value", at("resources.nodeSelector", {"a": "v" * 64}), "spec.resources.nodeSelector"),
    ("gpu resource traversal", at("resources.gpuResourceName", "../../x"), "spec.resources.gpuResourceName"),
    ("cpu not a quantity", at("resources.cpu", "1.2.3"), "spec.resources.cpu"),
    ("negative memory", at("resources.memory", "-1Gi"), "spec.resources.memory"),
    ("memory with injection", at("resources.memory", "1Gi; drop"), "spec.resources.memory"),
    ("service account bad name", at("resources.serviceAccountName", "Admin!"), "spec.resources.serviceAccountName"),
    ("negative gpus", at("resources.gpus", -1), "spec.resources.gpus"),
    ("host network", at("resources.hostNetwork", True), "hostNetwork"),
    ("privileged", at("resources.privileged", True), "privileged"),
    ("security context", at("resources.securityContext", {"runAsUser": 0}), "securityContext"),
    ("host path volume", at("volumes", [{"hostPath": {"path": "/"}}]), "volumes"),
    ("toleration seconds negative", at("resources.tolerations", [{"key": "a", "tolerationSeconds": -5}]),
     "spec.resources.tolerations[0].tolerationSeconds"),
    # references and keys
    ("configmap key traversal", both(at("dataset", {"configMapRef": {"name": "rows", "key": "../../etc"}})),
     "spec.dataset.configMapRef.key"),
    ("secret key with slash", at("output.s3.credentialsSecretRef", {"name": "s3", "accessKeyIdKey": "a/b"}),
     "spec.output.s3.credentialsSecretRef.accessKeyIdKey"),
    ("token key with slash", at("baseModel.tokenSecretRef", {"name": "hf", "key": "../token"}),
     "spec.baseModel.tokenSecretRef.key"),
    ("secret in another namespace", at("output.s3.credentialsSecretRef", {"name": "s3", "namespace": "kube-system"}),
     "spec.output.s3.credentialsSecretRef.namespace"),
    # failures that would otherwise show only after training and export
    ("eval quantization not exported", both(at("export", {"gguf": ["q4_k_m"]}),
                                            at("evaluation", {"tasks": ["piqa"], "quantizations": ["f16"]})),
     "spec.evaluation.quantizations"),
    ("eval quantization not in default export", at("evaluation", {"tasks": ["piqa"], "quantizations": ["q8_0"]}),
     "spec.evaluation.quantizations"),
    ("nothing to export", at("export", {"gguf": [], "adapter": False}), "nothing to export"),
    ("eval task injection", at("evaluation", {"tasks": ["piqa; rm -rf /"]}), "spec.evaluation.tasks"),
    ("lora target injection", at("training.lora", {"targetModules": ["q_proj; import os"]}),
     "spec.training.lora.targetModules"),
    ("lora targets duplicated", at("training.lora", {"targetModules": ["q_proj", "q_proj"]}),
     "spec.training.lora.targetModules"),
    ("eval unknown quantization", at("evaluation", {"tasks": ["piqa"], "quantizations": ["q9_x"]}),
     "spec.evaluation.quantizations"),
    # careless values
    ("learning rate 5", at("training.learningRate", 5), "spec.training.learningRate"),
    ("sequence length 10M", at("training.maxSeqLength", 10_000_000), "spec.training.maxSeqLength"),
    ("batch size 100k", at("training.batchSize", 100_000), "spec.training.batchSize"),
    ("epochs 1000", both(at("training", {"epochs": 1000})), "spec.training.epochs"),
    ("lora alpha 0", at("training.lora", {"alpha": 0}), "spec.training.lora.alpha"),
    ("negative validation split", at("dataset.validationSplit", -0.1), "spec.dataset.validationSplit"),
    ("weight decay 2", at("training.weightDecay", 2), "spec.training.weightDecay"),
    ("warmup 150 %", at("training.warmupRatio", 1.5), "spec.training.warmupRatio"),
    ("negative seed", at("training.seed", -1), "spec.training.seed"),
    ("parity samples 0", at("export.paritySamples", 0), "spec.export.paritySamples"),
    ("few-shot 100", at("evaluation", {"tasks": ["piqa"], "numFewshot": 100}), "spec.evaluation.numFewshot"),
    ("eval limit 0", at("evaluation", {"tasks": ["piqa"], "limit": 0}), "spec.evaluation.limit"),
    ("deadline of 30 years", at("runPolicy.activeDeadlineSeconds", 10**9), "spec.runPolicy.activeDeadlineSeconds"),
    ("ttl of 30 years", at("runPolicy.ttlSecondsAfterFinished", 10**9), "spec.runPolicy.ttlSecondsAfterFinished"),
    ("backoff 1000", at("runPolicy.backoffLimit", 1000), "spec.runPolicy.backoffLimit"),
    ("unknown spec field", at("privileged", True), "privileged"),
]

# (id, mutation, reason, the field the message must name)
POLICY = "PolicyDenied"
OPERATOR: list[tuple[str, Callable[[dict], None], str, str]] = [
    ("metadata address", at("dataset.source", f"https://{IMDS}/latest/meta-data/iam/security-credentials/x"),
     POLICY, "spec.dataset.source"),
    ("metadata over http", at("dataset.source", f"http://{IMDS}/latest/meta-data/"), POLICY, "spec.dataset.source"),
    ("ec2 ipv6 metadata", at("dataset.source", "https://[fd00:ec2::254]/latest/meta-data/"), POLICY,
     "spec.dataset.source"),
    ("mapped metadata", at("dataset.source", f"https://[::ffff:{IMDS}]/x"), POLICY, "spec.dataset.source"),
    ("loopback", at("dataset.source", "https://127.0.0.1:8080/x.jsonl"), POLICY, "spec.dataset.source"),
    ("private 10/8", at("dataset.source", "https://10.0.0.1/x.jsonl"), POLICY, "spec.dataset.source"),
    ("private 192.168/16", at("dataset.source", "https://192.168.1.1/x.jsonl"), POLICY, "spec.dataset.source"),
    ("shared 100.64/10", at("dataset.source", "https://100.64.0.1/x.jsonl"), POLICY, "spec.dataset.source"),
    ("unspecified", at("dataset.source", "https://0.0.0.0/x.jsonl"), POLICY, "spec.dataset.source"),
    ("localhost", at("dataset.source", "https://localhost/x.jsonl"), POLICY, "spec.dataset.source"),
    ("apiserver", at("dataset.source", "https://kubernetes.default.svc/api/v1/secrets"), POLICY,
     "spec.dataset.source"),
    ("gcp metadata name", at("dataset.source", "https://metadata.google.internal/computeMetadata/v1/"), POLICY,
     "spec.dataset.source"),
    ("plain http", at("dataset.source", "http://example.com/data.jsonl"), POLICY, "spec.dataset.source"),
    ("endpoint at metadata", at("output.s3.endpoint", f"http://{IMDS}"), POLICY, "spec.output.s3.endpoint"),
    ("endpoint private", at("output.s3.endpoint", "https://10.1.2.3:9000"), POLICY, "spec.output.s3.endpoint"),
    ("endpoint in-cluster", at("output.s3.endpoint", "http://minio.storage.svc:9000"), POLICY,
     "spec.output.s3.endpoint"),
    ("dataset path outside roots", at("dataset.source", "/tmp/data.jsonl"), POLICY, "spec.dataset.source"),
    ("model path outside roots", both(at("baseModel", {}), at("baseModel.uri", "/home/user/model")), POLICY,
     "spec.baseModel.uri"),
    ("eval data outside roots", at("evaluation", {"tasks": ["piqa"], "dataUri": "/opt/tasks"}), POLICY,
     "spec.evaluation.dataUri"),
    ("foreign image", at("resources.image", "docker.io/evil/miner:latest"), POLICY, "spec.resources.image"),
    ("look-alike image", at("resources.image", "ghcr.io/finetune-operator/trainer-evil:1"), POLICY,
     "spec.resources.image"),
    ("other extended resource", both(at("resources.gpus", 1), at("resources.gpuResourceName", "example.com/fpga")),
     POLICY, "spec.resources.gpuResourceName"),
    ("unlisted priority class", at("resources.priorityClassName", "high-priority"), POLICY,
     "spec.resources.priorityClassName"),
    ("control-plane toleration", at("resources.tolerations", [{"key": "node-role.kubernetes.io/control-plane",
                                                               "operator": "Exists", "effect": "NoSchedule"}]),
     POLICY, "spec.resources.tolerations[0]"),
    ("unschedulable toleration", at("resources.tolerations", [{"key": "node.kubernetes.io/unschedulable",
                                                               "operator": "Exists"}]),
     POLICY, "spec.resources.tolerations[0]"),
    ("default service account", at("resources.serviceAccountName", "default"), POLICY,
     "spec.resources.serviceAccountName"),
    ("the operator's own account", at("resources.serviceAccountName", "hostile-finetune-operator"), POLICY,
     "spec.resources.serviceAccountName"),
    # what only the apiserver's Job validation can tell
    ("affinity with a bad label key", at("resources.affinity", {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "bad key!", "operator": "In", "values": ["a"]}]}]}}}), "JobRejected", "spec.resources"),
    ("affinity without topology key", at("resources.affinity", {"podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {}, "topologyKey": ""}]}}),
     "JobRejected", "topologyKey"),
    ("affinity with a bad operator", at("resources.affinity", {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "a", "operator": "Near", "values": ["a"]}]}]}}}), "JobRejected", "operator"),
    ("node selector with a bad key", at("resources.nodeSelector", {"bad key!": "x"}), "JobRejected", "nodeSelector"),
    # what only the operator's defaults can tell
    ("no bucket anywhere", at("output", {}), "InvalidSpec", "spec.output.s3.bucket"),
]


def test_the_table_is_large_and_covers_every_class():
    assert len(ADMISSION) + len(OPERATOR) >= 100
    assert {reason for *_, reason, _ in OPERATOR} == {POLICY, "JobRejected", "InvalidSpec"}


def test_a_plain_spec_is_accepted_by_admission(kubeconfig, crd):
    proc = kubectl(kubeconfig, "apply", "--dry-run=server", "-n", "default", "-f", "-",
                   input=yaml.safe_dump(manifest("plain", None)), check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("case, mutate, field", ADMISSION, ids=[c[0] for c in ADMISSION])
def test_admission_rejects_naming_the_field(kubeconfig, crd, case, mutate, field):
    proc = kubectl(kubeconfig, "apply", "--dry-run=server", "-n", "default", "-f", "-",
                   input=yaml.safe_dump(manifest("hostile", mutate)), check=False)
    assert proc.returncode != 0, f"{case}: accepted"
    assert field in proc.stderr, f"{case}: the error does not name {field!r}: {proc.stderr}"


def test_an_overlong_name_is_rejected(kubeconfig, crd):
    proc = kubectl(kubeconfig, "apply", "--dry-run=server", "-n", "default", "-f", "-",
                   input=yaml.safe_dump(manifest("a" * 53, None)), check=False)
    assert proc.returncode != 0 and "metadata.name" in proc.stderr


# ----------------------------------------------------------------------------- the operator, chart RBAC


@contextlib.contextmanager
def _chart_operator(kubeconfig, tmp: Path, release: str, security: dict[str, Any] | None = None):
    """A namespace, the chart installed for it (release `release`, `security` values over the
    defaults), and the operator run with the Deployment's env and the chart ServiceAccount's token."""
    ns = f"{release}-{uuid.uuid4().hex[:6]}"
    kubectl(kubeconfig, "create", "namespace", ns)
    wait_for(lambda: kubectl(kubeconfig, "-n", ns, "get", "sa", "default", check=False).returncode == 0, 60,
             "default ServiceAccount")
    helm = str(binaries.ensure().helm)
    home = tmp / "helm"
    henv = {**os.environ, "HELM_CACHE_HOME": str(home / "c"), "HELM_CONFIG_HOME": str(home / "f"),
            "HELM_DATA_HOME": str(home / "d")}
    values = tmp / "values.yaml"
    values.write_text(yaml.safe_dump({"watchNamespaces": [ns], "crds": {"enabled": False},
                                      "s3": {"bucket": ""}, "trainer": {"nodeSelector": NOWHERE},
                                      "security": security or {}}))
    helm_kube = [f"--kubeconfig={kubeconfig}", "--namespace", ns]
    subprocess.run([helm, "install", release, str(ROOT / "charts" / "finetune-operator"), *helm_kube,
                    "-f", str(values)], env=henv, check=True, capture_output=True, text=True)
    account = f"{release}-finetune-operator"
    dep = json.loads(kubectl(kubeconfig, "-n", ns, "get", "deployment", account, "-o", "json").stdout)
    container = dep["spec"]["template"]["spec"]["containers"][0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
    env.update({e["name"]: e.get("value", "") for e in container["env"]})
    token = kubectl(kubeconfig, "-n", ns, "create", "token", account, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(Path(kubeconfig).read_text())
    sa_cfg = tmp / "operator.kubeconfig"
    sa_cfg.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "clusters": admin["clusters"],
        "users": [{"name": "op", "user": {"token": token}}],
        "contexts": [{"name": "op", "context": {"cluster": admin["clusters"][0]["name"], "user": "op"}}],
        "current-context": "op"}))
    env.update(KUBECONFIG=str(sa_cfg), FINETUNE_METRICS_PORT="0", FINETUNE_LIVENESS_ENDPOINT="off",
               PYTHONUNBUFFERED="1")
    log = tmp / "operator.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", "from finetune_operator.__main__ import main; main()"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield ns, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        subprocess.run([helm, "uninstall", release, *helm_kube], env=henv, capture_output=True)
        kubectl(kubeconfig, "delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture(scope="module")
def chart_operator(cluster, kubeconfig, crd, tmp_path_factory):
    """The chart with its default security values (no per-job ServiceAccounts)."""
    with _chart_operator(kubeconfig, tmp_path_factory.mktemp("hostile"), "hostile") as running:
        yield running


@pytest.fixture(scope="module")
def override_operator(cluster, kubeconfig, crd, tmp_path_factory):
    """The chart with security.allowServiceAccountOverride: a spec may name its own ServiceAccount."""
    with _chart_operator(kubeconfig, tmp_path_factory.mktemp("override"), "override",
                         {"allowServiceAccountOverride": True}) as running:
        yield running


def _get(kubeconfig, ns: str, *args: str) -> Any:
    return json.loads(kubectl(kubeconfig, "-n", ns, "get", *args, "-o", "json").stdout)


@pytest.fixture(scope="module")
def refused(chart_operator, kubeconfig) -> dict[str, dict]:
    """Applies every OPERATOR case at once and waits for each to end; name -> FinetuneJob."""
    ns, log = chart_operator
    names = [f"op-{i}" for i in range(len(OPERATOR))]
    docs = [manifest(name, mutate) for name, (_, mutate, _, _) in zip(names, OPERATOR, strict=True)]
    proc = kubectl(kubeconfig, "-n", ns, "apply", "-f", "-", input="\n---\n".join(map(yaml.safe_dump, docs)),
                   check=False)
    assert proc.returncode == 0, proc.stderr

    def all_ended() -> dict[str, dict] | None:
        items = {o["metadata"]["name"]: o for o in _get(kubeconfig, ns, "ftj")["items"]}
        done = {n: o for n, o in items.items() if (o.get("status") or {}).get("phase") in ("Failed", "Succeeded")}
        return done if len(done) == len(names) else None

    try:
        ended = wait_for(all_ended, 180, "every hostile FinetuneJob to end", interval=1)
    except AssertionError:
        raise AssertionError(log.read_text()[-8000:]) from None
    time.sleep(3)  # any retry loop, duplicate Event or late child would show by now
    return {name: ended[name] for name in names}


@pytest.mark.parametrize("index", range(len(OPERATOR)), ids=[c[0] for c in OPERATOR])
def test_operator_fails_it_before_creating_anything(refused, chart_operator, kubeconfig, index):
    ns, _ = chart_operator
    case, _, reason, field = OPERATOR[index]
    name = f"op-{index}"
    status = refused[name]["status"]
    assert (status["phase"], status["reason"]) == ("Failed", reason), f"{case}: {status}"
    assert field in status["message"], f"{case}: {status['message']}"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Failed"]["status"] == conditions["Finished"]["status"] == "True"
    assert conditions["Succeeded"]["status"] == "False"
    assert not status.get("jobName")
    for kind in CHILD_KINDS:
        assert not _get(kubeconfig, ns, kind, "-l", f"finetune.dev/job={name}")["items"], f"{case}: a {kind} exists"
    events = [e for e in _get(kubeconfig, ns, "events")["items"]
              if e["involvedObject"].get("name") == name and e["reason"] == reason]
    assert len(events) == 1 and events[0].get("count", 1) == 1, f"{case}: {len(events)} events"


# ----------------------------------------------------------------------------- children it did not make


def _apply_ftj(kubeconfig, ns: str, name: str, mutate: Callable[[dict], None] | None = None) -> None:
    proc = kubectl(kubeconfig, "-n", ns, "apply", "-f", "-", input=yaml.safe_dump(manifest(name, mutate)), check=False)
    assert proc.returncode == 0, proc.stderr


def _wait_status(kubeconfig, ns: str, name: str, log: Path, done: Callable[[dict], bool], what: str) -> dict:
    def check() -> dict | None:
        status = _get(kubeconfig, ns, "ftj", name).get("status") or {}
        return status if done(status) else None
    try:
        return wait_for(check, 90, f"{name}: {what}", interval=1)
    except AssertionError:
        raise AssertionError(log.read_text()[-6000:]) from None


def _ended(status: dict) -> bool:
    return status.get("phase") in ("Failed", "Succeeded")


def _bindings_to(kubeconfig, ns: str, account: str) -> list[str]:
    return [rb["metadata"]["name"] for rb in _get(kubeconfig, ns, "rolebindings")["items"]
            if any(s.get("kind") == "ServiceAccount" and s.get("name") == account for s in rb.get("subjects") or [])]


@pytest.mark.parametrize("kind, name, child", [
    # a user with `edit` pre-creates the run's ConfigMap without the egress rule in it
    ("configmap", "taken-cm", "ConfigMap 'taken-cm-r1-config'"),
    # ... or the per-job ServiceAccount, to have the operator bind its Role to an account the user controls
    ("serviceaccount", "taken-sa", "ServiceAccount 'taken-sa-trainer'"),
])
def test_an_object_with_a_childs_name_is_never_taken_over(chart_operator, kubeconfig, kind, name, child):
    ns, log = chart_operator
    child_name = child.split("'")[1]
    kubectl(kubeconfig, "-n", ns, "create", kind, child_name)
    _apply_ftj(kubeconfig, ns, name)
    status = _wait_status(kubeconfig, ns, name, log, _ended, "Failed")
    assert (status["phase"], status["reason"]) == ("Failed", "ChildNotOwned"), status
    assert child in status["message"], status["message"]
    assert not status.get("jobName")
    for k in CHILD_KINDS:
        assert not _get(kubeconfig, ns, k, "-l", f"finetune.dev/job={name}")["items"], f"a {k} exists"
    assert _bindings_to(kubeconfig, ns, child_name) == []
    assert not _get(kubeconfig, ns, kind, child_name)["metadata"].get("ownerReferences")  # left as it was


def test_a_spec_named_service_account_is_never_bound(override_operator, kubeconfig):
    """Where the chart lets a spec name its ServiceAccount, the run uses it as it is: the operator
    binds its Role only to the per-job account it creates, and creates none here."""
    ns, log = override_operator
    kubectl(kubeconfig, "-n", ns, "create", "serviceaccount", "victim")
    _apply_ftj(kubeconfig, ns, "named-sa", at("resources.serviceAccountName", "victim"))
    status = _wait_status(kubeconfig, ns, "named-sa", log, lambda s: bool(s.get("jobName")), "its Job")
    job = _get(kubeconfig, ns, "job", status["jobName"])
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "victim"
    assert _bindings_to(kubeconfig, ns, "victim") == []
    assert not _get(kubeconfig, ns, "rolebindings", "-l", "finetune.dev/job=named-sa")["items"]
    assert not _get(kubeconfig, ns, "serviceaccounts", "-l", "finetune.dev/job=named-sa")["items"]


def test_a_child_the_apiserver_refuses_fails_the_run_and_leaves_nothing(chart_operator, kubeconfig):
    """A quota that forbids the run's ConfigMap: the Role, ServiceAccount and RoleBinding made before it
    are removed, and the run is Failed with the apiserver's message, not retried for ever."""
    ns, log = chart_operator
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-configmaps"},
             "spec": {"hard": {"configmaps": "0"}}}
    kubectl(kubeconfig, "-n", ns, "apply", "-f", "-", input=yaml.safe_dump(quota))
    try:
        wait_for(lambda: (_get(kubeconfig, ns, "resourcequota", "no-configmaps").get("status") or {}).get("used"),
                 60, "the quota's usage")
        _apply_ftj(kubeconfig, ns, "over-quota")
        status = _wait_status(kubeconfig, ns, "over-quota", log, _ended, "Failed")
    finally:
        kubectl(kubeconfig, "-n", ns, "delete", "resourcequota", "no-configmaps", check=False)
    assert (status["phase"], status["reason"]) == ("Failed", "ChildRejected"), status
    assert "ConfigMap 'over-quota-r1-config'" in status["message"] and "quota" in status["message"], status
    for k in CHILD_KINDS:
        assert not _get(kubeconfig, ns, k, "-l", "finetune.dev/job=over-quota")["items"], f"a {k} is left"


def test_a_pod_the_job_cannot_create_shows_in_the_status(chart_operator, kubeconfig):
    """A quota that forbids the pod: the Job changes no condition and has no pod, only FailedCreate
    Events; the status says so (Pending: the quota may be raised) instead of 'waiting for the trainer'."""
    ns, log = chart_operator
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}}
    kubectl(kubeconfig, "-n", ns, "apply", "-f", "-", input=yaml.safe_dump(quota))
    try:
        wait_for(lambda: (_get(kubeconfig, ns, "resourcequota", "no-pods").get("status") or {}).get("used"),
                 60, "the quota's usage")
        _apply_ftj(kubeconfig, ns, "no-pods")
        status = _wait_status(kubeconfig, ns, "no-pods", log, lambda s: s.get("reason") == "PodNotCreated",
                              "PodNotCreated")
    finally:
        kubectl(kubeconfig, "-n", ns, "delete", "resourcequota", "no-pods", check=False)
    assert status["phase"] == "Pending", status
    assert status["message"].startswith(f"Job {status['jobName']} cannot create its pod:"), status["message"]
    assert "exceeded quota" in status["message"], status["message"]
