"""The Helm chart (charts/finetune-operator), from `helm lint` to install/upgrade/uninstall.

Tiers, cheapest first:
- offline: lint, documented values, schema rejections, and the rendered RBAC, security context,
  env wiring and optional objects, read from `helm template`; plus the chart's helm-unittest suites;
- against the real local apiserver (fixtures from conftest.py): server-side dry-run of everything
  the chart renders, RBAC checked by impersonating the operator's ServiceAccount, helm
  install/upgrade/uninstall, and the operator run with exactly the chart's env and ServiceAccount
  reconciling a FinetuneJob.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack import binaries
from devstack.procs import free_port

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "finetune-operator"
HEALTH_LUA = ROOT / "argocd" / "resource_customizations" / "finetune.dev" / "FinetuneJob" / "health.lua"
SWEEP_HEALTH_LUA = ROOT / "argocd" / "resource_customizations" / "finetune.dev" / "FinetuneSweep" / "health.lua"
# The cluster version the offline renders and lint assume (the chart sets no kubeVersion gate, so a
# render without it works too: test_renders_without_a_kube_version).
KUBE_VERSION = "1.36.3"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
CRD_NAME = "finetunejobs.finetune.dev"
SWEEP_CRD_NAME = "finetunesweeps.finetune.dev"
HELM_UNITTEST_VERSION = "1.1.2"

# Exactly what the operator uses in each namespace it watches: (apiGroup, resource) -> verbs.
NAMESPACED_RULES: dict[tuple[str, str], set[str]] = {
    ("finetune.dev", "finetunejobs"): {"get", "list", "watch", "create", "patch", "update"},
    ("finetune.dev", "finetunejobs/status"): {"get", "patch", "update"},
    ("finetune.dev", "finetunejobs/finalizers"): {"update"},
    ("finetune.dev", "finetunesweeps"): {"get", "list", "watch", "patch", "update"},
    ("finetune.dev", "finetunesweeps/status"): {"get", "patch", "update"},
    ("finetune.dev", "finetunesweeps/finalizers"): {"update"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "delete", "patch"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "configmaps"): {"get", "list", "watch", "create", "delete", "patch"},
    ("", "secrets"): {"get"},
    ("", "services"): {"get", "create", "delete"},  # the headless Service of a multi-pod run
    ("", "serviceaccounts"): {"get", "list", "watch", "create", "delete"},
    ("rbac.authorization.k8s.io", "roles"): {"get", "list", "watch", "create", "delete", "patch"},
    ("rbac.authorization.k8s.io", "rolebindings"): {"get", "list", "watch", "create", "delete", "patch"},
    ("", "events"): {"list", "create", "patch"},  # list: a Job's FailedCreate Events
    ("events.k8s.io", "events"): {"create", "patch"},
}
CRD_RULES = {("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"}}
NAMESPACE_RULES = {("", "namespaces"): {"list", "watch"}}


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> Iterator[str]:
    """The cached helm binary, with its config, cache and plugins kept out of $HOME."""
    home = tmp_path_factory.mktemp("helm-home")
    saved = {k: os.environ.get(k) for k in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME")}
    os.environ.update(HELM_CACHE_HOME=str(home / "cache"), HELM_CONFIG_HOME=str(home / "config"),
                      HELM_DATA_HOME=str(home / "data"))
    yield str(binaries.ensure().helm)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def run(argv: list[str], *, check: bool = True, stdin: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def values_args(tmp_path: Path, values: dict[str, Any] | None) -> list[str]:
    if not values:
        return []
    path = tmp_path / f"values-{len(list(tmp_path.glob('values-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["-f", str(path)]


def render_text(helm: str, tmp_path: Path, values: dict[str, Any] | None = None, *, release: str = "fto",
                namespace: str = "ml-system") -> str:
    argv = [helm, "template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION]
    return run(argv + values_args(tmp_path, values)).stdout


def render(helm: str, tmp_path: Path, values: dict[str, Any] | None = None, **kw: Any) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(render_text(helm, tmp_path, values, **kw)) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None,
         namespace: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind
            and (name is None or d["metadata"]["name"] == name)
            and (namespace is None or d["metadata"].get("namespace") == namespace)]


def one(docs: list[dict[str, Any]], kind: str, **kw: Any) -> dict[str, Any]:
    found = find(docs, kind, **kw)
    assert len(found) == 1, f"expected one {kind} {kw}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def rule_map(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs; fails on wildcards, resourceNames and duplicate entries."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in (group, resource) and "*" not in rule["verbs"], rule
                assert (group, resource) not in out, f"{group}/{resource} granted twice"
                out[(group, resource)] = set(rule["verbs"])
    return out


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in container["env"]}


# ----------------------------------------------------------------------------- offline


def test_helm_lint_strict(helm: str, tmp_path: Path) -> None:
    everything_on = {"watchNamespaces": ["a", "b"], "argocd": {"healthCheck": {"enabled": True}},
                     "metrics": {"serviceMonitor": {"enabled": True}}}
    for values in (None, everything_on):
        out = run([helm, "lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART),
                   *values_args(tmp_path, values)]).stdout
        assert "1 chart(s) linted, 0 chart(s) failed" in out


def _chart_keys(node: yaml.MappingNode, schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, int]]:
    """(dotted key, line) of every key the chart defines; Kubernetes objects passed through
    (resources, securityContext, ...) count as one key."""
    for key_node, value_node in node.value:
        key = key_node.value
        sub = schema["properties"].get(key)
        assert sub is not None, f"values.yaml key {path}{key} is missing from values.schema.json"
        yield f"{path}{key}", key_node.start_mark.line
        if isinstance(value_node, yaml.MappingNode) and sub.get("additionalProperties") is False:
            yield from _chart_keys(value_node, sub, f"{path}{key}.")


def _schema_keys(schema: dict[str, Any], path: str = "") -> Iterator[str]:
    for key, sub in schema.get("properties", {}).items():
        yield f"{path}{key}"
        if sub.get("type") == "object" and "properties" in sub:
            assert sub.get("additionalProperties") is False, f"{path}{key} accepts unknown keys"
            yield from _schema_keys(sub, f"{path}{key}.")


def test_every_value_is_documented_and_in_the_schema() -> None:
    text = (CHART / "values.yaml").read_text()
    lines = text.splitlines()
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema.get("additionalProperties") is False
    keys = dict(_chart_keys(yaml.compose(text), schema))
    for key, line in keys.items():
        above = next((p for p in reversed(lines[:line]) if p.strip()), "")
        assert above.strip().startswith("#"), f"values.yaml: {key} (line {line + 1}) has no comment above it"
    # Every key the schema allows appears in values.yaml, so each one has a documented default.
    assert set(_schema_keys(schema)) == set(keys)


@pytest.mark.parametrize(("values", "message"), [
    ({"replicaCount": 2}, "additional properties 'replicaCount' not allowed"),
    ({"trainer": {"gpuResource": "amd.com/gpu"}}, "additional properties 'gpuResource' not allowed"),
    ({"metrics": {"serviceMonitor": {"enabled": True, "intervall": "1m"}}}, "'intervall' not allowed"),
    ({"metrics": {"port": "8080"}}, "got string, want integer"),
    ({"crds": {"keep": "yes"}}, "got string, want boolean"),
    ({"watchNamespaces": "ml"}, "got string, want array"),
    ({"watchNamespaces": ["ML_Team"]}, "does not match pattern"),
    ({"image": {"pullPolicy": "Sometimes"}}, "value must be one of"),
    ({"metrics": {"port": 8081}}, "/metrics/port"),
    ({"s3": {"endpoint": "minio:9000"}}, "does not match pattern"),
    ({"s3": {"endpoint": "http://ak:sk@minio:9000"}}, "does not match pattern"),
    ({"mcp": {"s3Endpoint": "http://ak:sk@seaweedfs:8333"}}, "does not match pattern"),
    ({"s3": {"credentialsSecretName": "x/../y"}}, "does not match pattern"),
    ({"security": {"egress": {"allowedHosts": ["http://minio:9000"]}}}, "does not match pattern"),
    ({"security": {"localPathRoots": ["relative/"]}}, "does not match pattern"),
    ({"security": {"allowedTolerations": [{"operator": "Exists"}]}}, "missing property 'key'"),
], ids=["unknown-top-level", "unknown-nested", "unknown-deep", "int-as-string", "bool-as-string",
        "list-as-string", "bad-namespace", "bad-enum", "port-clash-with-health", "endpoint-without-scheme",
        "endpoint-with-credentials", "mcp-endpoint-with-credentials", "unanchored-secret-name", "allowed-host-url", "relative-path-root",
        "tolerate-everything"])
def test_schema_rejects(helm: str, tmp_path: Path, values: dict[str, Any], message: str) -> None:
    argv = [helm, "template", "fto", str(CHART), "--kube-version", KUBE_VERSION, *values_args(tmp_path, values)]
    proc = run(argv, check=False)
    assert proc.returncode != 0, proc.stdout
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert message in proc.stderr, proc.stderr


def test_schema_rejects_a_typo_given_with_set(helm: str) -> None:
    proc = run([helm, "template", "fto", str(CHART), "--kube-version", KUBE_VERSION,
                "--set", "trainer.nodeSelecter.gpu=true"], check=False)
    assert proc.returncode != 0
    assert "additional properties 'nodeSelecter' not allowed" in proc.stderr


def test_rbac_all_namespaces_is_one_cluster_role(helm: str, tmp_path: Path) -> None:
    docs = render(helm, tmp_path)
    assert not find(docs, "Role") and not find(docs, "RoleBinding")
    role = one(docs, "ClusterRole")
    # Cluster-wide, kopf never reads Namespace objects.
    assert rule_map(role["rules"]) == NAMESPACED_RULES | CRD_RULES
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "fto-finetune-operator",
                                    "namespace": "ml-system"}]
    assert one(docs, "ServiceAccount")["metadata"]["name"] == "fto-finetune-operator"
    assert env_of(one(docs, "Deployment"))["FINETUNE_WATCH_NAMESPACES"] == ""


def test_rbac_listed_namespaces_get_roles_and_only_scanning_is_cluster_wide(helm: str, tmp_path: Path) -> None:
    docs = render(helm, tmp_path, {"watchNamespaces": ["team-a", "team-b"]})
    cluster_role = one(docs, "ClusterRole")
    assert cluster_role["metadata"]["name"] == "fto-finetune-operator-scanning"
    assert rule_map(cluster_role["rules"]) == CRD_RULES | NAMESPACE_RULES
    assert one(docs, "ClusterRoleBinding")["roleRef"]["name"] == cluster_role["metadata"]["name"]
    for ns in ("team-a", "team-b"):
        role = one(docs, "Role", namespace=ns)
        assert rule_map(role["rules"]) == NAMESPACED_RULES
        binding = one(docs, "RoleBinding", namespace=ns)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": role["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "fto-finetune-operator",
                                        "namespace": "ml-system"}]
    assert not find(docs, "Role", namespace="ml-system")
    assert env_of(one(docs, "Deployment"))["FINETUNE_WATCH_NAMESPACES"] == "team-a,team-b"


def test_rbac_can_be_left_to_the_user(helm: str, tmp_path: Path) -> None:
    docs = render(helm, tmp_path, {"rbac": {"create": False},
                                   "serviceAccount": {"create": False, "name": "platform-operator"}})
    assert not {d["kind"] for d in docs} & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                                            "ServiceAccount"}
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "platform-operator"


def test_security_context_is_restricted(helm: str, tmp_path: Path) -> None:
    pod = one(render(helm, tmp_path), "Deployment")["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert "add" not in sc["capabilities"] and not sc.get("privileged")
    # With a read-only root, /tmp is the one writable place.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == mounts["/tmp"])
    assert not any("hostPath" in v for v in pod["volumes"])
    assert not pod.get("hostNetwork") and not pod.get("hostPID")


def test_env_is_what_the_operator_reads(helm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chart's env, fed to the operator's own config loader, yields the values set in the chart."""
    from finetune_operator.config import OperatorConfig

    values = {
        "trainer": {"image": {"repository": "registry.example/trainer", "tag": "1.2.3", "pullPolicy": "Always"},
                    "gpuResourceName": "amd.com/gpu", "nodeSelector": {"gpu": "mi300"},
                    "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "progressIntervalSeconds": 9},
        "s3": {"endpoint": "http://seaweedfs.storage:8333", "bucket": "models",
               "credentialsSecretName": "s3-credentials"},
        "kueue": {"queueName": "gpu-queue"},
        "watchNamespaces": ["ml", "research"],
        "metrics": {"port": 9090},
        "security": {"egress": {"allowHttp": True, "allowedHosts": ["minio.storage.svc:9000", "10.0.0.7"]},
                     "localPathRoots": ["/models/"], "allowedImages": ["registry.example/ml/"],
                     "allowedGpuResources": ["amd.com/gpu"], "allowedPriorityClasses": ["batch-low"],
                     "allowedTolerations": [{"key": "spot", "operator": "Exists"}],
                     "allowServiceAccountOverride": True, "compileCache": False, "maxKeepWarmSeconds": 120},
    }
    env = env_of(one(render(helm, tmp_path, values), "Deployment"))
    for key in [k for k in os.environ if k.startswith("FINETUNE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = OperatorConfig.from_env()
    assert cfg.trainer_image == "registry.example/trainer:1.2.3"
    assert cfg.image_pull_policy == "Always"
    assert cfg.default_gpu_resource == "amd.com/gpu"
    assert cfg.default_node_selector == {"gpu": "mi300"}
    assert cfg.default_tolerations == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert cfg.progress_interval_seconds == 9
    assert cfg.default_queue_name == "gpu-queue"
    assert cfg.default_s3_endpoint == "http://seaweedfs.storage:8333"
    assert cfg.watch_namespaces == ("ml", "research")
    assert cfg.metrics_port == 9090
    assert env["FINETUNE_DEFAULT_S3_BUCKET"] == "models"
    assert env["FINETUNE_DEFAULT_S3_CREDENTIALS_SECRET"] == "s3-credentials"
    assert cfg.compile_cache is False
    assert cfg.egress_allow_http is True
    assert cfg.egress_allowed_hosts == ("minio.storage.svc:9000", "10.0.0.7")
    assert cfg.local_path_roots == ("/models/",) and cfg.allowed_images == ("registry.example/ml/",)
    assert cfg.allowed_gpu_resources == ("amd.com/gpu",) and cfg.allowed_priority_classes == ("batch-low",)
    assert cfg.allowed_tolerations == [{"key": "spot", "operator": "Exists"}]
    assert cfg.allow_service_account_override is True
    assert cfg.max_keep_warm_seconds == 120


def test_security_defaults_allow_nothing_beyond_the_admins_own_settings(helm: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_operator.config import OperatorConfig

    env = env_of(one(render(helm, tmp_path), "Deployment"))
    for key in [k for k in os.environ if k.startswith("FINETUNE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = OperatorConfig.from_env()
    assert not cfg.egress_allow_http and cfg.egress_allowed_hosts == ()
    assert cfg.local_path_roots == ("/data/", "/models/", "/mnt/")
    assert cfg.allowed_images == cfg.allowed_gpu_resources == cfg.allowed_priority_classes == ()
    assert cfg.allowed_tolerations == [] and not cfg.allow_service_account_override
    assert cfg.trainer_image == "ghcr.io/finetune-operator/trainer:0.1.0"
    assert cfg.watch_namespaces == () and cfg.default_queue_name is None and cfg.default_s3_endpoint is None
    assert cfg.max_keep_warm_seconds == 900  # the chart's default cap on spec.runPolicy.keepWarmSeconds


def test_renders_without_a_kube_version(helm: str) -> None:
    """`helm template` with no cluster and no --kube-version renders (no kubeVersion gate in Chart.yaml)."""
    proc = run([helm, "template", "fto", str(CHART)])
    kinds = {d["kind"] for d in yaml.safe_load_all(proc.stdout) if d}
    assert {"Deployment", "CustomResourceDefinition", "ClusterRole"} <= kinds


@pytest.mark.parametrize("crd_name", [CRD_NAME, SWEEP_CRD_NAME])
def test_templated_crd_is_the_generated_one(helm: str, tmp_path: Path, crd_name: str) -> None:
    """The chart's CRD renders to crds/'s generated CRD plus Helm's labels and the keep policy."""
    docs = render(helm, tmp_path)
    assert {d["metadata"]["name"] for d in find(docs, "CustomResourceDefinition")} == {CRD_NAME, SWEEP_CRD_NAME}
    crd = one(docs, "CustomResourceDefinition", name=crd_name)
    plural, group = crd_name.split(".", 1)
    generated = yaml.safe_load((ROOT / "crds" / f"{group}_{plural}.yaml").read_text())
    assert crd["metadata"]["name"] == generated["metadata"]["name"] == crd_name
    assert crd["spec"] == generated["spec"]
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


def test_chart_health_lua_is_the_argocd_one() -> None:
    assert (CHART / "files" / "health.lua").read_bytes() == HEALTH_LUA.read_bytes()
    assert (CHART / "files" / "health-finetunesweep.lua").read_bytes() == SWEEP_HEALTH_LUA.read_bytes()


def test_argocd_patch_configmap(helm: str, tmp_path: Path) -> None:
    assert not find(render(helm, tmp_path), "ConfigMap")
    cm = one(render(helm, tmp_path, {"argocd": {"healthCheck": {"enabled": True}}}), "ConfigMap")
    patch = yaml.safe_load(cm["data"]["argocd-cm-patch.yaml"])
    assert patch == {"data": {"resource.customizations.health.finetune.dev_FinetuneJob": HEALTH_LUA.read_text(),
                              "resource.customizations.health.finetune.dev_FinetuneSweep": SWEEP_HEALTH_LUA.read_text()}}
    assert cm["data"]["health.lua"] == HEALTH_LUA.read_text()
    assert cm["data"]["health-finetunesweep.lua"] == SWEEP_HEALTH_LUA.read_text()


@pytest.fixture(scope="session")
def helm_unittest() -> str:
    """helm-unittest, built once from the Go module proxy into the stack cache.

    `go install …@v1.1.2` refuses it (its go.mod has a replace directive), so, as for the
    apiserver, a throwaway wrapper module requires it and repeats that replace.
    """
    out = binaries.cache_dir() / "bin" / f"helm-unittest-{HELM_UNITTEST_VERSION}" / "helm-unittest"
    if not os.access(out, os.X_OK):
        build = binaries.cache_dir() / "build" / "helm-unittest"
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir(parents=True)
        env = {**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}
        for argv in (["go", "mod", "init", "wrapper"],
                     ["go", "mod", "edit",
                      "-replace=github.com/vmware-labs/yaml-jsonpath@v0.3.2=github.com/helm-unittest/yaml-jsonpath@v0.4.0"],
                     ["go", "get", f"github.com/helm-unittest/helm-unittest@v{HELM_UNITTEST_VERSION}"],
                     ["go", "build", "-ldflags", "-s -w", "-o", str(out) + ".tmp",
                      "github.com/helm-unittest/helm-unittest/cmd/helm-unittest"]):
            proc = subprocess.run(argv, cwd=build, env=env, capture_output=True, text=True, check=False)
            assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr}"
        os.replace(str(out) + ".tmp", out)
    return str(out)


def test_helm_unittest_suites(helm_unittest: str) -> None:
    suites = sorted((CHART / "tests").glob("*_test.yaml"))
    assert suites, "charts/finetune-operator/tests/ has no suites"
    proc = run([helm_unittest, "--strict", "--color=false", str(CHART)], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Test Suites: {len(suites)} passed, {len(suites)} total" in proc.stdout, proc.stdout


# ----------------------------------------------------------------------------- local cluster


def kubectl(kubeconfig: Path, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return run([KUBECTL, f"--kubeconfig={kubeconfig}", *args], check=check, stdin=stdin)


def adopt_crd(kubeconfig: Path, release: str, namespace: str) -> None:
    """Let `release` take over a CRD another release (or a plain kubectl apply) left behind.

    The cluster is shared by the whole session and crds.keep leaves the CRD after uninstall;
    Helm adopts an existing object only when it already carries that release's ownership metadata.
    """
    for name in (CRD_NAME, SWEEP_CRD_NAME):
        if kubectl(kubeconfig, "get", "crd", name, check=False).returncode != 0:
            continue
        kubectl(kubeconfig, "label", "crd", name, "app.kubernetes.io/managed-by=Helm", "--overwrite")
        kubectl(kubeconfig, "annotate", "crd", name, f"meta.helm.sh/release-name={release}",
                f"meta.helm.sh/release-namespace={namespace}", "--overwrite")


@pytest.mark.cluster
@pytest.mark.parametrize("scenario", ["all-namespaces", "listed-namespace", "everything-optional"])
def test_rendered_manifests_pass_server_side_dry_run(helm: str, tmp_path: Path, kubeconfig: Path,
                                                     namespace: str, scenario: str) -> None:
    values: dict[str, Any] = {
        "all-namespaces": {},
        "listed-namespace": {"watchNamespaces": [namespace]},
        # Everything but the ServiceMonitor, whose CRD (prometheus-operator) this cluster lacks.
        "everything-optional": {"argocd": {"healthCheck": {"enabled": True}},
                                "trainer": {"nodeSelector": {"gpu": "h100"},
                                            "tolerations": [{"key": "gpu", "operator": "Exists"}]},
                                "s3": {"endpoint": "http://s3:8333", "bucket": "models",
                                       "credentialsSecretName": "s3"},
                                "imagePullSecrets": [{"name": "regcred"}],
                                "podAnnotations": {"a": "b"}, "nodeSelector": {"type": "kwok"},
                                "tolerations": [{"key": "x", "operator": "Exists"}],
                                "affinity": {"nodeAffinity": {}}},
    }[scenario]
    manifests = render_text(helm, tmp_path, values, release=f"dry-{namespace[-6:]}", namespace=namespace)
    proc = kubectl(kubeconfig, "apply", "--dry-run=server", "-f", "-", stdin=manifests)
    kinds = {d["kind"] for d in yaml.safe_load_all(manifests) if d}
    for kind in kinds:
        assert re.search(rf"^{kind.lower()}(\.[\w.]+)?/\S+ (created|configured|unchanged) \(server dry run\)$",
                         proc.stdout, re.M), f"{kind} missing from:\n{proc.stdout}"


def _json_stream(text: str) -> list[dict[str, Any]]:
    """kubectl create -o json prints one JSON document per object, back to back."""
    decoder, docs, pos = json.JSONDecoder(), [], 0
    while pos < len(text.rstrip()):
        doc, end = decoder.raw_decode(text, pos)
        docs.append(doc)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return docs


def access_reviews(kubeconfig: Path, user: str,
                   asks: list[tuple[str, str, str, str | None]]) -> dict[tuple[str, str, str, str | None], bool]:
    """SubjectAccessReviews for (verb, group, resource[/sub], namespace), all in one kubectl call."""
    items = []
    for verb, group, resource, ns in asks:
        name, _, sub = resource.partition("/")
        attrs = {"verb": verb, "group": group, "resource": name, **({"subresource": sub} if sub else {}),
                 **({"namespace": ns} if ns else {})}
        items.append({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                      "spec": {"user": user, "groups": ["system:serviceaccounts", "system:authenticated"],
                               "resourceAttributes": attrs}})
    out = kubectl(kubeconfig, "create", "-o", "json", "-f", "-",
                  stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": items})).stdout
    answers = _json_stream(out)
    return {ask: bool(a["status"].get("allowed")) for ask, a in zip(asks, answers, strict=True)}


def assert_rbac(kubeconfig: Path, sa: str, namespace: str, other: str, *, cluster_wide: bool) -> None:
    """Exactly the chart's verbs where the operator works, nothing elsewhere, no more cluster-wide.

    `namespace` is watched in both modes; `other` only when watching all namespaces."""
    watched = {namespace, other} if cluster_wide else {namespace}
    every_verb = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
    asks = [(verb, group, resource, ns) for (group, resource) in NAMESPACED_RULES
            for verb in every_verb for ns in (namespace, other)]
    asks += [(verb, "apiextensions.k8s.io", "customresourcedefinitions", None) for verb in every_verb]
    asks += [(verb, "", "namespaces", None) for verb in every_verb]
    asks += [(verb, "", resource, namespace) for verb in every_verb for resource in ("pods/exec", "pods/log")]
    asks += [("create", "", "pods", namespace), ("list", "", "nodes", None),
             ("create", "rbac.authorization.k8s.io", "clusterroles", None),
             ("escalate", "rbac.authorization.k8s.io", "roles", namespace),
             ("bind", "rbac.authorization.k8s.io", "roles", namespace)]
    allowed = access_reviews(kubeconfig, sa, asks)
    expected = {}
    for verb, group, resource, ns in asks:
        if group == "apiextensions.k8s.io":
            expected[(verb, group, resource, ns)] = verb in ("get", "list", "watch")
        elif (group, resource) == ("", "namespaces"):
            expected[(verb, group, resource, ns)] = verb in ("list", "watch") and not cluster_wide
        else:
            verbs = NAMESPACED_RULES.get((group, resource), set())
            expected[(verb, group, resource, ns)] = verb in verbs and ns in watched
    wrong = {ask: allowed[ask] for ask in asks if allowed[ask] != expected[ask]}
    assert not wrong, f"allowed != expected for {wrong}"


def assert_can_create_trainer_rbac(kubeconfig: Path, sa: str, namespace: str) -> None:
    """As the operator: the per-job Role the builders make, bound to a ServiceAccount.

    RBAC refuses to let anyone grant what they do not hold, so this proves the chart gives the
    operator enough to hand each trainer its status-patching Role.
    """
    from finetune_operator import builders

    owner = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob",
             "metadata": {"name": "rbac-probe", "namespace": namespace, "uid": "00000000-0000-0000-0000-000000000001"}}
    objs = [builders.build_service_account(owner), builders.build_role(owner),
            builders.build_role_binding(owner, builders.trainer_account_name("rbac-probe"))]
    for obj in objs:
        obj["metadata"].pop("ownerReferences")  # the owner is made up; GC would collect the objects
    manifest = "\n---\n".join(yaml.safe_dump(o) for o in objs)
    kubectl(kubeconfig, "create", f"--as={sa}", "-f", "-", stdin=manifest)
    kubectl(kubeconfig, "delete", f"--as={sa}", "-f", "-", stdin=manifest)


def deployment_available(kubeconfig: Path, namespace: str, name: str) -> None:
    kubectl(kubeconfig, "-n", namespace, "rollout", "status", f"deployment/{name}", "--timeout=120s")


@pytest.mark.cluster
def test_helm_install_upgrade_uninstall(helm: str, tmp_path: Path, kubeconfig: Path, namespace: str,
                                        cluster: Any) -> None:
    release = f"fto-{namespace[-6:]}"
    fullname = f"{release}-finetune-operator"
    sa = f"system:serviceaccount:{namespace}:{fullname}"
    other = f"{namespace}-other"
    kubectl(kubeconfig, "create", "namespace", other)
    helm_kube = [f"--kubeconfig={kubeconfig}", "--namespace", namespace]
    # No container runtime here: pin the operator pod to a kwok node, which reports it running.
    base = {"nodeSelector": {"type": "kwok"}}
    try:
        adopt_crd(kubeconfig, release, namespace)
        run([helm, "install", release, str(CHART), *helm_kube, "--wait", "--timeout", "3m",
             *values_args(tmp_path, base)])
        deployment_available(kubeconfig, namespace, fullname)
        assert kubectl(kubeconfig, "get", "crd", CRD_NAME, "-o", "jsonpath={.metadata.annotations}").stdout
        assert_rbac(kubeconfig, sa, namespace, other, cluster_wide=True)
        assert_can_create_trainer_rbac(kubeconfig, sa, namespace)

        # Upgrade: narrow the watch to one namespace and change a trainer default.
        run([helm, "upgrade", release, str(CHART), *helm_kube, "--wait", "--timeout", "3m",
             *values_args(tmp_path, {**base, "watchNamespaces": [namespace],
                                     "trainer": {"gpuResourceName": "amd.com/gpu"}})])
        dep = json.loads(kubectl(kubeconfig, "-n", namespace, "get", "deployment", fullname, "-o", "json").stdout)
        assert env_of(dep)["FINETUNE_WATCH_NAMESPACES"] == namespace
        assert env_of(dep)["FINETUNE_DEFAULT_GPU_RESOURCE"] == "amd.com/gpu"
        assert kubectl(kubeconfig, "get", "clusterrole", fullname, check=False).returncode != 0
        assert kubectl(kubeconfig, "get", "clusterrole", f"{fullname}-scanning").returncode == 0
        assert_rbac(kubeconfig, sa, namespace, other, cluster_wide=False)
        assert_can_create_trainer_rbac(kubeconfig, sa, namespace)
        history = json.loads(run([helm, "history", release, *helm_kube, "-o", "json"]).stdout)
        assert [h["status"] for h in history] == ["superseded", "deployed"]
    finally:
        run([helm, "uninstall", release, *helm_kube, "--wait"], check=False)
        kubectl(kubeconfig, "delete", "namespace", other, "--wait=false", check=False)

    for kind, name, ns in (("deployment", fullname, namespace), ("serviceaccount", fullname, namespace),
                           ("clusterrole", f"{fullname}-scanning", None), ("role", fullname, namespace)):
        where = ["-n", ns] if ns else []
        assert kubectl(kubeconfig, "get", kind, name, *where, check=False).returncode != 0, f"{kind} {name} left"
    # crds.keep: the CRD, and with it every FinetuneJob, outlives the release.
    assert kubectl(kubeconfig, "get", "crd", CRD_NAME).returncode == 0


@pytest.mark.cluster
def test_argocd_cm_patch_merges_into_an_existing_argocd_cm(helm: str, tmp_path: Path, kubeconfig: Path,
                                                           namespace: str) -> None:
    """The command NOTES.txt prints adds the health check and keeps argocd-cm's other settings."""
    argocd_ns = f"{namespace}-argocd"
    kubectl(kubeconfig, "create", "namespace", argocd_ns)
    try:
        kubectl(kubeconfig, "-n", argocd_ns, "create", "configmap", "argocd-cm", "--from-literal=url=https://cd.example")
        manifests = render_text(helm, tmp_path, {"argocd": {"healthCheck": {"enabled": True}}, "crds": {"enabled": False},
                                                 "rbac": {"create": False}, "serviceAccount": {"create": False, "name": "x"},
                                                 "metrics": {"enabled": False}},
                                release="fto", namespace=namespace)
        cm = one([d for d in yaml.safe_load_all(manifests) if d], "ConfigMap")
        kubectl(kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump(cm))
        patch = kubectl(kubeconfig, "-n", namespace, "get", "configmap", cm["metadata"]["name"],
                        "-o", "jsonpath={.data.argocd-cm-patch\\.yaml}").stdout
        kubectl(kubeconfig, "-n", argocd_ns, "patch", "configmap", "argocd-cm", "--type", "merge", "-p", patch)
        data = json.loads(kubectl(kubeconfig, "-n", argocd_ns, "get", "configmap", "argocd-cm", "-o", "json").stdout)["data"]
        assert data == {"url": "https://cd.example",
                        "resource.customizations.health.finetune.dev_FinetuneJob": HEALTH_LUA.read_text(),
                        "resource.customizations.health.finetune.dev_FinetuneSweep": SWEEP_HEALTH_LUA.read_text()}
    finally:
        kubectl(kubeconfig, "delete", "namespace", argocd_ns, "--wait=false", check=False)


def _service_account_kubeconfig(kubeconfig: Path, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount (TokenRequest), like the in-cluster pod."""
    token = kubectl(kubeconfig, "-n", namespace, "create", "token", sa, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(kubeconfig.read_text())
    cluster = admin["clusters"][0]
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "clusters": [cluster],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": cluster["name"], "user": sa, "namespace": namespace}}],
        "current-context": sa,
    }))
    return path


def _wait_for(what: str, fn: Any, timeout: float, proc: subprocess.Popen[str] | None = None,
              log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"operator exited {proc.returncode} waiting for {what}:\n{log.read_text() if log else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-6000:] if log else ''}")
        time.sleep(0.5)


@pytest.mark.cluster
@pytest.mark.parametrize("scope", ["listed-namespace", "all-namespaces"])
def test_operator_reconciles_with_the_charts_env_and_service_account(
        helm: str, tmp_path: Path, kubeconfig: Path, namespace: str, scope: str) -> None:
    """The operator, run locally (no container runtime) with the env of the chart's Deployment and the
    token of the chart's ServiceAccount, takes a FinetuneJob from nothing to a Job without a single
    Forbidden: proof that the chart's RBAC is not only minimal but enough, in both watch scopes."""
    release = f"op-{namespace[-6:]}"
    fullname = f"{release}-finetune-operator"
    helm_kube = [f"--kubeconfig={kubeconfig}", "--namespace", namespace]
    values = {"watchNamespaces": [namespace] if scope == "listed-namespace" else [],
              "nodeSelector": {"type": "kwok"}, "trainer": {"nodeSelector": {"type": "kwok"}}}
    adopt_crd(kubeconfig, release, namespace)
    run([helm, "install", release, str(CHART), *helm_kube, "--wait", "--timeout", "3m",
         *values_args(tmp_path, values)])
    log = tmp_path / "operator.log"
    proc = None
    try:
        dep = json.loads(kubectl(kubeconfig, "-n", namespace, "get", "deployment", fullname, "-o", "json").stdout)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
        env.update(env_of(dep))
        env["KUBECONFIG"] = str(_service_account_kubeconfig(kubeconfig, namespace, fullname, tmp_path / "sa.kubeconfig"))
        env["FINETUNE_METRICS_PORT"] = "0"  # any free port: the chart's 8080 may be taken on this host
        # A free port of its own: kopf reads port 0 as "none" and binds 80, which another process may hold.
        env["FINETUNE_LIVENESS_ENDPOINT"] = f"http://127.0.0.1:{free_port()}/healthz"
        kubectl(kubeconfig, "-n", namespace, "create", "secret", "generic", "s3-credentials",
                "--from-literal=AWS_ACCESS_KEY_ID=a", "--from-literal=AWS_SECRET_ACCESS_KEY=b")
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, "-c", "from finetune_operator.__main__ import main; main()"],
                                    env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob",
               "metadata": {"name": "chart-probe", "namespace": namespace},
               "spec": {"baseModel": {"name": "tiny/model"}, "dataset": {"source": "tiny/data"},
                        "training": {"maxSteps": 1}, "resources": {"gpus": 0},
                        "runPolicy": {"suspend": True},
                        "output": {"s3": {"bucket": "models", "credentialsSecretRef": {"name": "s3-credentials"}}}}}
        kubectl(kubeconfig, "apply", "-f", "-", stdin=json.dumps(job))

        def job_created() -> Any:
            out = kubectl(kubeconfig, "-n", namespace, "get", "jobs.batch", "-l", "finetune.dev/job=chart-probe",
                          "-o", "json").stdout
            return json.loads(out)["items"]

        (batch_job,) = _wait_for("the training Job", job_created, 90, proc, log)
        for kind in ("serviceaccount", "role", "rolebinding", "configmap"):
            items = json.loads(kubectl(kubeconfig, "-n", namespace, "get", kind, "-l", "finetune.dev/job=chart-probe",
                                       "-o", "json").stdout)["items"]
            assert items, f"the operator created no {kind}"

        def phase() -> str:
            return kubectl(kubeconfig, "-n", namespace, "get", "ftj", "chart-probe",
                           "-o", "jsonpath={.status.phase}").stdout

        assert _wait_for("a status phase", phase, 60, proc, log)
        # No RBAC refusal. Watching all namespaces, it also meets an earlier test's FinetuneJob whose namespace is
        # being deleted: the apiserver refuses new events there with a 403 too (NamespaceTerminating), no RBAC gap.
        forbidden = [line for line in log.read_text().splitlines()
                     if "Forbidden" in line and "NamespaceTerminating" not in line]
        assert not forbidden, log.read_text()
        # The operator never writes spec: what was applied is what is stored (no Argo CD drift).
        stored = json.loads(kubectl(kubeconfig, "-n", namespace, "get", "ftj", "chart-probe", "-o", "json").stdout)
        assert stored["spec"] == job["spec"]
        assert batch_job["spec"]["template"]["spec"]["containers"][0]["image"] == env["FINETUNE_TRAINER_IMAGE"]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        run([helm, "uninstall", release, *helm_kube, "--wait"], check=False)



# ----------------------------------------------------------------------------- examples/argocd

ARGOCD_EXAMPLES = ROOT / "examples" / "argocd"


def _applications() -> list[Path]:
    return sorted(ARGOCD_EXAMPLES.glob("*-application.yaml"))


@pytest.mark.parametrize("path", _applications(), ids=lambda p: p.stem)
def test_argocd_example_application_points_at_this_repository(path: Path) -> None:
    app = yaml.safe_load(path.read_text())
    assert (app["apiVersion"], app["kind"]) == ("argoproj.io/v1alpha1", "Application")
    source = app["spec"]["source"]
    assert (ROOT / source["path"]).is_dir(), f"{path.name}: source.path {source['path']} is not in the repository"
    assert app["spec"]["destination"]["server"] == "https://kubernetes.default.svc"
    assert int(app["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) >= 0


def test_argocd_example_operator_values_pass_the_chart_schema(helm: str, tmp_path: Path) -> None:
    """The chart values the example Application carries render, and do what its comments say."""
    app = yaml.safe_load((ARGOCD_EXAMPLES / "operator-application.yaml").read_text())
    assert app["spec"]["source"]["path"] == "charts/finetune-operator"
    helm_source = app["spec"]["source"]["helm"]
    docs = render(helm, tmp_path, helm_source["valuesObject"], release=helm_source["releaseName"],
                  namespace=app["spec"]["destination"]["namespace"])
    assert one(docs, "Role", namespace="ml")
    assert one(docs, "ConfigMap")["metadata"]["name"].endswith("-argocd-health")


def test_argocd_example_finetunejobs_follow_the_application() -> None:
    app = yaml.safe_load((ARGOCD_EXAMPLES / "finetunejobs-application.yaml").read_text())
    jobs = sorted((ROOT / app["spec"]["source"]["path"]).glob("*.yaml"))
    assert jobs
    from finetune_api import FinetuneJobSpec

    for path in jobs:
        obj = yaml.safe_load(path.read_text())
        assert (obj["apiVersion"], obj["kind"]) == ("finetune.dev/v1alpha1", "FinetuneJob")
        assert obj["metadata"]["namespace"] == app["spec"]["destination"]["namespace"]
        FinetuneJobSpec.model_validate(obj["spec"])


@pytest.mark.cluster
def test_argocd_example_finetunejobs_pass_server_side_dry_run(kubeconfig: Path, namespace: str) -> None:
    """Admitted by the real apiserver with the generated CRD (its CEL rules included)."""
    if kubectl(kubeconfig, "get", "crd", CRD_NAME, check=False).returncode != 0:
        kubectl(kubeconfig, "apply", "--server-side", "-f", str(ROOT / "crds" / "finetune.dev_finetunejobs.yaml"))
        kubectl(kubeconfig, "wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    for path in sorted((ARGOCD_EXAMPLES / "finetunejobs").glob("*.yaml")):
        obj = yaml.safe_load(path.read_text())
        obj["metadata"]["namespace"] = namespace
        out = kubectl(kubeconfig, "apply", "--dry-run=server", "-f", "-", stdin=json.dumps(obj)).stdout
        assert "created (server dry run)" in out, out


@pytest.mark.parametrize("values", [{"fullnameOverride": "f" * 70}, {"nameOverride": "n" * 40}])
def test_every_name_fits_63_characters(helm: str, tmp_path: Path, values: dict[str, Any]) -> None:
    values = {**values, "watchNamespaces": ["ml"], "argocd": {"healthCheck": {"enabled": True}},
              "metrics": {"enabled": True, "serviceMonitor": {"enabled": True}}}
    for doc in render(helm, tmp_path, values, release="r" * 30):
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
        assert not doc["metadata"]["name"].endswith("-"), doc["metadata"]["name"]
