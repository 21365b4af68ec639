"""The chart's optional MCP server (mcp.enabled): rendered objects, least-privilege RBAC, and the server
run with exactly the Deployment's env and the chart ServiceAccount's token against the real apiserver.

Offline: `helm template` (the real helm binary) renders nothing by default, refuses mcp.enabled without
a token Secret, and renders a Deployment, a Service and the server's own ServiceAccount with a Role in
each allowed namespace (finetunejobs get/list/watch/create/patch, configmaps get; never secrets).
Against the local apiserver: SubjectAccessReviews for that ServiceAccount, and the MCP server over
streamable HTTP acting with its token — it creates and re-runs a FinetuneJob and previews a ConfigMap
dataset without a single Forbidden, while the token stays required.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack import binaries

pytest_plugins = ["operator_fixtures"]  # crd: the FinetuneJob CRD applied to the local apiserver
ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "finetune-operator"
KUBE_VERSION = "1.36.3"  # go-installed helm needs it to render offline (the chart wants >= 1.29)
RELEASE, NS = "fto", "ml-system"
MCP = f"{RELEASE}-finetune-operator-mcp"
TOKEN_SECRET = {"mcp": {"enabled": True, "auth": {"existingSecret": "mcp-token"}}}
MCP_RULES = {("finetune.dev", "finetunejobs"): {"get", "list", "watch", "create", "patch"},
             ("", "configmaps"): {"get"}}


@pytest.fixture(scope="module")
def helm(tmp_path_factory) -> Iterator[str]:
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


def run(argv: list[str], *, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def merged(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def template(helm: str, tmp_path: Path, values: dict[str, Any] | None = None, *, namespace: str = NS,
             release: str = RELEASE, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [helm, "template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION]
    if values:
        path = tmp_path / f"values-{len(list(tmp_path.glob('values-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(values))
        argv += ["-f", str(path)]
    return run(argv, check=check)


def render(helm: str, tmp_path: Path, values: dict[str, Any] | None = None, **kw: Any) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(template(helm, tmp_path, values, **kw).stdout) if d]


def mcp_docs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if (d["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "mcp-server"]


def one(docs: list[dict[str, Any]], kind: str, namespace: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (namespace is None or d["metadata"].get("namespace") == namespace)]
    assert len(found) == 1, f"expected one {kind} in {namespace}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def rule_map(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in (group, resource, *rule["verbs"]), rule
                out[(group, resource)] = set(rule["verbs"])
    return out


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


# ----------------------------------------------------------------------------- offline


def test_nothing_is_rendered_by_default(helm: str, tmp_path: Path) -> None:
    docs = render(helm, tmp_path)
    assert not mcp_docs(docs)
    assert not [d for d in docs if d["metadata"]["name"].endswith("-mcp")]


def test_enabling_it_without_a_token_secret_fails_with_the_reason(helm: str, tmp_path: Path) -> None:
    proc = template(helm, tmp_path, {"mcp": {"enabled": True}}, check=False)
    assert proc.returncode != 0
    assert "mcp.auth.existingSecret is required" in proc.stderr and "bearer token" in proc.stderr


def test_helm_lint_strict_with_the_mcp_server(helm: str, tmp_path: Path) -> None:
    values = merged(TOKEN_SECRET, {"mcp": {"namespaces": ["a", "b"]}})
    path = tmp_path / "lint.yaml"
    path.write_text(yaml.safe_dump(values))
    out = run([helm, "lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART), "-f", str(path)]).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out


def test_deployment_service_and_own_service_account(helm: str, tmp_path: Path) -> None:
    docs = render(helm, tmp_path, TOKEN_SECRET)
    mine = mcp_docs(docs)
    assert sorted(d["kind"] for d in mine) == ["Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"]
    dep = one(mine, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == MCP
    operator = next(d for d in docs if d["kind"] == "Deployment" and d not in mine)
    assert pod["serviceAccountName"] != operator["spec"]["template"]["spec"]["serviceAccountName"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/finetune-operator/mcp:0.1.0"
    assert container["args"] == ["--transport", "http", "--host", "0.0.0.0", "--port", "8000"]
    env = env_of(dep)
    assert env["FINETUNE_MCP_NAMESPACES"] == NS and env["FINETUNE_MCP_ALLOW_LOCAL_PATHS"] == "0"
    # The token arrives as a file from the Secret the kubelet mounts, never as a value in the manifest.
    assert env["FINETUNE_MCP_TOKEN_FILE"] == "/var/run/finetune-mcp/token"
    assert "FINETUNE_MCP_TOKEN" not in env
    token_volume = next(v for v in pod["volumes"] if v["name"] == "token")
    assert token_volume["secret"] == {"secretName": "mcp-token", "items": [{"key": "token", "path": "token"}]}
    assert {"name": "token", "mountPath": "/var/run/finetune-mcp", "readOnly": True} in container["volumeMounts"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "mcp"}

    # Selectors: the Service reaches the MCP pods only, and the operator's selectors never match them.
    labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = one(mine, "Service")
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"] == [{"name": "mcp", "port": 8000, "targetPort": "mcp", "protocol": "TCP"}]
    assert not operator["spec"]["selector"]["matchLabels"].items() <= labels.items()
    metrics = next(d for d in docs if d["kind"] == "Service" and d not in mine)
    assert not metrics["spec"]["selector"].items() <= labels.items()


def test_role_is_least_privilege_in_each_allowed_namespace(helm: str, tmp_path: Path) -> None:
    docs = mcp_docs(render(helm, tmp_path, merged(TOKEN_SECRET, {"mcp": {"namespaces": ["team-a", "team-b"]}})))
    assert env_of(one(docs, "Deployment"))["FINETUNE_MCP_NAMESPACES"] == "team-a,team-b"
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    for ns in ("team-a", "team-b"):
        role = one(docs, "Role", namespace=ns)
        assert rule_map(role["rules"]) == MCP_RULES
        binding = one(docs, "RoleBinding", namespace=ns)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": MCP}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": MCP, "namespace": NS}]
    assert not [d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] == NS]

    no_cm = mcp_docs(render(helm, tmp_path, merged(TOKEN_SECRET, {"mcp": {"readConfigMaps": False}})))
    assert rule_map(one(no_cm, "Role")["rules"]) == {("finetune.dev", "finetunejobs"): MCP_RULES[("finetune.dev", "finetunejobs")]}


def test_env_is_what_the_server_reads(helm: str, tmp_path: Path) -> None:
    from finetune_mcp import config

    values = merged(TOKEN_SECRET, {"mcp": {"namespaces": ["ml", "research"], "pollSeconds": 3,
                                           "s3Endpoint": "http://seaweedfs:8333", "port": 9000}})
    dep = one(mcp_docs(render(helm, tmp_path, values)), "Deployment")
    env = env_of(dep) | {"FINETUNE_MCP_TOKEN_FILE": ""}  # the mounted file does not exist here
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    cfg = config.from_env(env, fallback_namespace="elsewhere", transport=args[1], host=args[3], port=int(args[5]))
    assert cfg.namespaces == ("ml", "research") and cfg.default_namespace == "ml"
    assert cfg.poll_seconds == 3 and cfg.s3_endpoint == "http://seaweedfs:8333" and cfg.port == 9000
    assert cfg.allow_local_paths is False and cfg.transport == "http"
    with pytest.raises(config.ConfigError, match="without a bearer token"):
        cfg.check()  # 0.0.0.0 and no token: the server refuses to start


@pytest.mark.parametrize(("values", "message"), [
    ({"mcp": {"enabeld": True}}, "additional properties 'enabeld' not allowed"),
    ({"mcp": {"namespaces": "ml"}}, "got string, want array"),
    ({"mcp": {"namespaces": ["ML"]}}, "does not match pattern"),
    ({"mcp": {"port": "8000"}}, "got string, want integer"),
    ({"mcp": {"auth": {"secret": "x"}}}, "additional properties 'secret' not allowed"),
], ids=["typo", "namespaces-as-string", "bad-namespace", "port-as-string", "auth-typo"])
def test_schema_rejects(helm: str, tmp_path: Path, values: dict[str, Any], message: str) -> None:
    proc = template(helm, tmp_path, values, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_image_is_what_the_chart_runs() -> None:
    """Dockerfile.mcp: the `mcp` extra only (no torch), the `finetune-mcp` entrypoint, the chart's uid, hadolint clean."""
    import tomllib

    from test_dockerfiles import final_stage, parse, project_installs

    dockerfile = ROOT / "Dockerfile.mcp"
    assert project_installs(dockerfile) == [".[mcp]"]
    steps = " ".join(i.args for i in parse(dockerfile) if i.cmd in ("RUN", "COPY"))
    assert "torch" not in steps
    (entry,) = [i for i in final_stage(parse(dockerfile)) if i.cmd == "ENTRYPOINT"]
    assert yaml.safe_load(entry.args) == ["finetune-mcp"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["finetune-mcp"] == "finetune_mcp.cli:main"
    (user,) = [i.args for i in final_stage(parse(dockerfile)) if i.cmd == "USER"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert user == f"{values['podSecurityContext']['runAsUser']}:{values['podSecurityContext']['runAsGroup']}"
    hadolint = Path(sys.executable).parent / "hadolint"
    proc = run([str(hadolint), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(dockerfile)], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- against the apiserver


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["kubectl", f"--kubeconfig={kubeconfig}", *args], stdin=stdin, check=check)


def access(kubeconfig: Path, user: str, asks: list[tuple[str, str, str, str]]) -> dict[tuple[str, str, str, str], bool]:
    """SubjectAccessReviews for (verb, group, resource[/sub], namespace)."""
    out = {}
    for verb, group, resource, ns in asks:
        name, _, sub = resource.partition("/")
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                  "spec": {"user": user, "groups": ["system:serviceaccounts", "system:authenticated"],
                           "resourceAttributes": {"verb": verb, "group": group, "resource": name, "namespace": ns,
                                                  **({"subresource": sub} if sub else {})}}}
        answer = json.loads(kubectl(kubeconfig, "create", "-o", "json", "-f", "-", stdin=json.dumps(review)).stdout)
        out[(verb, group, resource, ns)] = bool(answer["status"].get("allowed"))
    return out


def sa_kubeconfig(kubeconfig: Path, namespace: str, sa: str, path: Path) -> Path:
    token = kubectl(kubeconfig, "-n", namespace, "create", "token", sa, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(kubeconfig.read_text())
    cluster = admin["clusters"][0]
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "clusters": [cluster], "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": cluster["name"], "user": sa, "namespace": namespace}}],
        "current-context": sa}))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.cluster
def test_server_with_the_charts_env_and_service_account(helm: str, tmp_path: Path, kubeconfig: Path,
                                                         namespace: str, crd: Path) -> None:
    """The MCP objects pass server-side dry-run; the ServiceAccount may do exactly what the tools need
    and nothing of what they must not (Secrets, status, Jobs, other namespaces); and the server, run with
    the Deployment's env and that ServiceAccount's token, creates, re-runs and previews without Forbidden."""
    import anyio

    release = f"m{namespace[-6:]}"
    name = f"{release}-finetune-operator-mcp"
    values = merged(TOKEN_SECRET, {"mcp": {"namespaces": [namespace]}, "crds": {"enabled": False}})
    manifests = template(helm, tmp_path, values, namespace=namespace, release=release).stdout
    mine = mcp_docs([d for d in yaml.safe_load_all(manifests) if d])
    text = "\n---\n".join(yaml.safe_dump(d) for d in mine)
    dry = kubectl(kubeconfig, "apply", "--dry-run=server", "-f", "-", stdin=text).stdout
    assert dry.count("(server dry run)") == len(mine), dry
    kubectl(kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump_all([d for d in mine if d["kind"] != "Deployment"]))

    other = f"{namespace}-x"
    kubectl(kubeconfig, "create", "namespace", other)
    try:
        user = f"system:serviceaccount:{namespace}:{name}"
        every = ("get", "list", "watch", "create", "update", "patch", "delete")
        asks = [(v, "finetune.dev", "finetunejobs", ns) for v in every for ns in (namespace, other)]
        asks += [(v, "finetune.dev", "finetunejobs/status", namespace) for v in ("update", "patch")]
        asks += [(v, "", "secrets", namespace) for v in ("get", "list", "watch")]
        asks += [(v, "", "configmaps", namespace) for v in ("get", "list", "create")]
        asks += [("create", "batch", "jobs", namespace), ("create", "", "pods", namespace)]
        allowed = access(kubeconfig, user, asks)

        def expected(verb: str, group: str, resource: str, ns: str) -> bool:
            return ns == namespace and verb in MCP_RULES.get((group, resource), set())

        assert {a: allowed[a] for a in asks if allowed[a] != expected(*a)} == {}

        # The server as the chart runs it (bound to loopback here, token from a file as the Secret mounts it).
        dep = one(mine, "Deployment")
        token_file = tmp_path / "token"
        token_file.write_text("s3cr3t-token\n")
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FINETUNE_", "KUBECONFIG"))}
        env |= env_of(dep) | {"FINETUNE_MCP_TOKEN_FILE": str(token_file), "FINETUNE_MCP_PICKUP_SECONDS": "0.5"}
        kcfg = sa_kubeconfig(kubeconfig, namespace, name, tmp_path / "sa.kubeconfig")
        kubectl(kubeconfig, "-n", namespace, "create", "configmap", "rows",
                "--from-literal=train.jsonl=" + "\n".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"})
                                                          for i in range(5)))
        log = (tmp_path / "mcp.log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", "finetune_mcp", "--transport", "http", "--host", "127.0.0.1",
                                 "--port", str(port), "--kubeconfig", str(kcfg)], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            anyio.run(_drive_as_service_account, port, namespace, proc, tmp_path / "mcp.log")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        assert "Forbidden" not in (tmp_path / "mcp.log").read_text()
    finally:
        kubectl(kubeconfig, "delete", "namespace", other, "--wait=false", check=False)


async def _drive_as_service_account(port: int, namespace: str, proc: subprocess.Popen, log: Path) -> None:
    import anyio
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    url = f"http://127.0.0.1:{port}/mcp"
    deadline = time.monotonic() + 60
    async with httpx2.AsyncClient() as plain:
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if (await plain.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            await anyio.sleep(0.3)
        # No token, a wrong token: 401 before any MCP message is read.
        hello = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        assert (await plain.post(url, json=hello)).status_code == 401
        assert (await plain.post(url, json=hello, headers={"Authorization": "Bearer nope"})).status_code == 401

    async with httpx2.AsyncClient(headers={"Authorization": "Bearer s3cr3t-token"}, timeout=60) as http, \
            Client(streamable_http_client(url, http_client=http)) as client:
        created = await client.call_tool("finetune_unsloth", {
            "base_model": "tiny/model", "dataset": "tiny/data", "max_steps": 1, "gpus": 0, "name": "via-mcp"})
        assert not created.is_error, created.content[0].text
        assert created.structured_content["name"] == "via-mcp"
        assert created.structured_content["namespace"] == namespace  # the allowed namespace is the default
        status = await client.call_tool("get_status", {"job": "via-mcp"})
        assert not status.is_error and status.structured_content["spec"]["maxSteps"] == 1
        listed = await client.call_tool("list_jobs", {})
        assert [j["name"] for j in listed.structured_content["jobs"]] == ["via-mcp"]
        # No operator runs here, so the run stays Pending: adjust_and_rerun still patches the spec.
        patched = await client.call_tool("adjust_and_rerun", {"job": "via-mcp", "max_steps": 2})
        assert not patched.is_error, patched.content[0].text
        assert patched.structured_content["specPatch"] == {"training": {"maxSteps": 2}}
        preview = await client.call_tool("prepare_dataset", {"config_map": {"name": "rows", "key": "train.jsonl"}})
        assert not preview.is_error, preview.content[0].text
        assert preview.structured_content["rows"] == {"read": 5, "usable": 5, "malformed": 0}
        foreign = await client.call_tool("get_status", {"job": "via-mcp", "namespace": "kube-system"})
        assert foreign.is_error and "not one this server allows" in foreign.content[0].text

