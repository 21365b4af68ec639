"""Turn a Pod (as a dict) into local processes' argv, env, working dir and materialised volumes.

Part of the local pod runner (dev/test harness). Without a container runtime there is no mount
namespace, so each volume is written to a host temp dir and every occurrence of its mountPath in the
container's command, args and env values is rewritten to that dir (likewise workingDir and
terminationMessagePath).
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


class NotReady(Exception):
    """A referenced Secret/ConfigMap is missing: the kubelet reports CreateContainerConfigError and retries."""


class Kube(Protocol):
    def get(self, path: str) -> dict | None: ...  # None when 404
    def post(self, path: str, body: dict) -> dict: ...


@dataclass
class Launch:
    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    termination_file: Path
    termination_policy: str
    restart_policy: str = "Never"
    mapping: list[tuple[str, str]] = field(default_factory=list)


class PathMap:
    """Rewrites container paths (mount points) to host dirs, longest mount first, whole path parts only."""

    def __init__(self, pairs: list[tuple[str, str]]):
        self.pairs = sorted(((m.rstrip("/") or "/", h) for m, h in pairs), key=lambda p: -len(p[0]))
        self._hosts = dict(self.pairs)
        if self.pairs:
            # A mount path counts only as a whole path prefix: "/data" must not rewrite "/mnt/data" or
            # "/database"; "file:///data" still is a path.
            alts = "|".join(re.escape(m) for m, _ in self.pairs)
            self._re = re.compile(rf"(?:(?<![\w./-])|(?<=://))({alts})(?=/|$|[^\w.-])")

    def __call__(self, s: str) -> str:
        if not self.pairs:
            return s
        return self._re.sub(lambda m: self._hosts[m.group(1)], s)


class ServiceHosts:
    """Names under a pod's headless Service (<host>.<subdomain>[.<ns>[.svc[.cluster.local]]]) → this host.

    Every pod here shares the host's network, so pod i of an Indexed Job is 127.0.0.1 too; a port
    after such a name becomes one the runner picked for that Service and port (`port_for`), so that
    two runs' rendezvous on this host never collide."""

    def __init__(self, subdomain: str | None, namespace: str, port_for: Callable[[str, int], int]):
        self.port_for = port_for
        self._re = None
        if subdomain:
            domain = rf"{re.escape(subdomain)}(?:\.{re.escape(namespace)}(?:\.svc(?:\.cluster\.local)?)?)?"
            self._re = re.compile(rf"(?<![\w.-])[a-z0-9]([-a-z0-9]*[a-z0-9])?\.{domain}(?::(\d+))?(?![\w.-])")
        self.subdomain = subdomain

    def __call__(self, s: str) -> str:
        if self._re is None:
            return s

        def local(m: re.Match) -> str:
            port = m.group(2)
            return "127.0.0.1" + (f":{self.port_for(self.subdomain, int(port))}" if port else "")

        return self._re.sub(local, s)


def expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: $$ escapes, unknown references stay as they are."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), s)


class PodSandbox:
    """Materialises one pod's volumes under `root` and builds a Launch per container."""

    def __init__(self, pod: dict, root: Path, kube: Kube, base_env: dict[str, str], service_env: dict[str, str],
                 port_for: Callable[[str, int], int] | None = None):
        self.pod = pod
        self.root = root
        self.kube = kube
        self.base_env = base_env
        self.service_env = service_env
        self.ns = pod["metadata"]["namespace"]
        self.volume_dirs: dict[str, Path] = {}
        self.hosts = ServiceHosts(pod["spec"].get("subdomain"), self.ns, port_for or (lambda _service, port: port))

    # --- volumes ---------------------------------------------------------------------------------
    def materialise_volumes(self) -> None:
        for vol in self.pod["spec"].get("volumes") or []:
            self.volume_dirs[vol["name"]] = self._volume(vol)

    def _volume(self, vol: dict) -> Path:
        if "hostPath" in vol:  # no isolation anyway: the host path is the volume
            return Path(vol["hostPath"]["path"])
        d = self.root / "volumes" / vol["name"]
        d.mkdir(parents=True, exist_ok=True)
        if "configMap" in vol:
            self._write_keys(d, self._configmap(vol["configMap"]), vol["configMap"].get("items"))
        elif "secret" in vol:
            src = vol["secret"]
            self._write_keys(d, self._secret({"name": src.get("secretName"), **src}), src.get("items"))
        elif "downwardAPI" in vol:
            self._write_downward(d, vol["downwardAPI"].get("items") or [])
        elif "projected" in vol:
            for source in vol["projected"].get("sources") or []:
                self._projected(d, source)
        # emptyDir and anything unsupported (PVCs, ...) are simply an empty dir.
        return d

    def _projected(self, d: Path, source: dict) -> None:
        if "serviceAccountToken" in source:
            src = source["serviceAccountToken"]
            self._write(d / src["path"], self._token(src.get("audience"), src.get("expirationSeconds", 3607)))
        elif "configMap" in source:
            self._write_keys(d, self._configmap(source["configMap"]), source["configMap"].get("items"))
        elif "secret" in source:
            self._write_keys(d, self._secret(source["secret"]), source["secret"].get("items"))
        elif "downwardAPI" in source:
            self._write_downward(d, source["downwardAPI"].get("items") or [])

    def _token(self, audience: str | None, expiration: int) -> bytes:
        # A bound token from the TokenRequest API, as the kubelet obtains it: tied to this pod, so it
        # dies with the pod and the apiserver's audience/RBAC checks apply unchanged.
        meta = self.pod["metadata"]
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": [audience] if audience else [], "expirationSeconds": expiration,
                         "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}}}
        resp = self.kube.post(f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token", body)
        return resp["status"]["token"].encode()

    def _configmap(self, ref: dict) -> dict[str, bytes]:
        cm = self.kube.get(f"/api/v1/namespaces/{self.ns}/configmaps/{ref['name']}")
        if cm is None:
            if ref.get("optional"):
                return {}
            raise NotReady(f'configmap "{ref["name"]}" not found')
        out = {k: v.encode() for k, v in (cm.get("data") or {}).items()}
        out.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
        return out

    def _secret(self, ref: dict) -> dict[str, bytes]:
        secret = self.kube.get(f"/api/v1/namespaces/{self.ns}/secrets/{ref['name']}")
        if secret is None:
            if ref.get("optional"):
                return {}
            raise NotReady(f'secret "{ref["name"]}" not found')
        return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}

    def _write_keys(self, d: Path, data: dict[str, bytes], items: list[dict] | None) -> None:
        if items is None:
            items = [{"key": k, "path": k} for k in data]
        for item in items:
            if item["key"] in data:
                self._write(d / item["path"], data[item["key"]], item.get("mode"))

    def _write_downward(self, d: Path, items: list[dict]) -> None:
        for item in items:
            if "fieldRef" in item:
                self._write(d / item["path"], self.field(item["fieldRef"]["fieldPath"]).encode())

    @staticmethod
    def _write(path: Path, data: bytes, mode: int | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode if mode is not None else 0o644)

    def close(self) -> None:
        """Release what launching took (processes need nothing; containers do)."""

    # --- env -------------------------------------------------------------------------------------
    def field(self, path: str) -> str:
        pod = self.pod
        simple = {
            "metadata.name": pod["metadata"]["name"], "metadata.namespace": self.ns,
            "metadata.uid": pod["metadata"]["uid"], "spec.nodeName": pod["spec"].get("nodeName", ""),
            "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
            # The process shares the host's network, so its address is the host's.
            "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1",
        }
        if path in simple:
            return simple[path]
        m = re.fullmatch(r"metadata\.(labels|annotations)(?:\['(.+)'\])?", path)
        if m:
            values = pod["metadata"].get(m.group(1)) or {}
            if m.group(2):
                return values.get(m.group(2), "")
            return "\n".join(f"{k}={json.dumps(v)}" for k, v in sorted(values.items()))
        raise NotReady(f"unsupported fieldRef {path}")

    def _env(self, container: dict) -> dict[str, str]:
        env: dict[str, str] = {}
        for src in container.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                data = self._configmap(src["configMapRef"])
            else:
                data = self._secret(src["secretRef"])
            env.update({prefix + k: v.decode() for k, v in data.items()})
        for var in container.get("env") or []:
            if "value" in var or "valueFrom" not in var:
                env[var["name"]] = expand(var.get("value", ""), env)
                continue
            ref = var["valueFrom"]
            if "fieldRef" in ref:
                env[var["name"]] = self.field(ref["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in ref or "configMapKeyRef" in ref:
                key_ref = ref.get("secretKeyRef") or ref["configMapKeyRef"]
                data = self._secret(key_ref) if "secretKeyRef" in ref else self._configmap(key_ref)
                if key_ref["key"] in data:
                    env[var["name"]] = data[key_ref["key"]].decode()
                elif not key_ref.get("optional"):
                    raise NotReady(f'couldn\'t find key {key_ref["key"]} in {key_ref["name"]}')
            # resourceFieldRef: not modelled (no cgroups here).
        return env

    # --- launch ----------------------------------------------------------------------------------
    def launch(self, container: dict) -> Launch:
        name = container["name"]
        cdir = self.root / "containers" / name
        cdir.mkdir(parents=True, exist_ok=True)
        pairs: list[tuple[str, str]] = []
        for mount in container.get("volumeMounts") or []:
            if mount["mountPath"].rstrip("/") == "/tmp":
                continue  # a scratch /tmp (readOnlyRootFilesystem): local processes already have the host's
            host = self.volume_dirs.get(mount["name"])
            if host is None:
                raise NotReady(f'volume "{mount["name"]}" not found in the pod')
            pairs.append((mount["mountPath"], str(host / mount["subPath"]) if mount.get("subPath") else str(host)))
        term_path = container.get("terminationMessagePath") or "/dev/termination-log"
        term_file = cdir / "termination-log"
        term_file.write_bytes(b"")
        pairs.append((term_path, str(term_file)))
        remap = PathMap(pairs)
        # workingDir: remapped when under a mount, else its own temp dir (which the argv remap also covers).
        wd = container.get("workingDir")
        if wd and remap(wd) != wd:
            cwd = Path(remap(wd))
        else:
            cwd = cdir / "workdir"
            if wd:
                remap = PathMap([*pairs, (wd, str(cwd))])
        cwd.mkdir(parents=True, exist_ok=True)

        raw_env = self._env(container)
        argv_raw = [*(container.get("command") or []), *(container.get("args") or [])]
        # $(VAR) is expanded with the unmapped values; each string is then remapped exactly once.
        argv = [self.hosts(remap(expand(a, raw_env))) for a in argv_raw]
        env = {**self.base_env, **self.service_env, "HOSTNAME": self.pod["metadata"]["name"]}
        sa_dir = next((h for m, h in pairs if m.rstrip("/") == SA_MOUNT), None)
        if sa_dir:
            # The trainer reads its in-cluster credentials from here instead of the fixed path.
            env["FINETUNE_SERVICEACCOUNT_DIR"] = sa_dir
        env.update({k: self.hosts(remap(v)) for k, v in raw_env.items()})
        return Launch(name=name, argv=argv, env=env, cwd=cwd, termination_file=term_file,
                      termination_policy=container.get("terminationMessagePolicy", "File"),
                      restart_policy=self.pod["spec"].get("restartPolicy", "Always"), mapping=remap.pairs)


def clean_env() -> dict[str, str]:
    """What a container gets from its 'image': PATH (this venv first, so `python`/`finetune` are the
    project's), HOME and locale. Nothing else leaks in from the host (e.g. no KUBECONFIG)."""
    venv_bin = str(Path(sys.prefix) / "bin")
    path = os.pathsep.join([venv_bin, os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")])
    env = {"PATH": path, "HOME": os.environ.get("HOME", "/root")}
    env.update({k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TZ", "TMPDIR")})
    return env
