"""The container flavour of the local pod runner: pods bound to its node run from their real images.

Where LocalPodRunner runs a pod's command as a host process in this venv (no isolation, paths
rewritten), ContainerPodRunner does what a kubelet with a CRI runtime does, by hand: the image comes
out of the local store (hack/images.sh), volumes are materialised as for the process runner and
bind-mounted at their mountPaths (emptyDirs world-writable, medium Memory as tmpfs, the projected
service-account token at the real path), the user is the securityContext's (runAsNonRoot enforced),
capabilities are dropped as asked, and runc runs it. Status, restarts and deletion are the process
runner's, unchanged.

`harden=True` adds what a restricted cluster's admission policy would: a read-only root filesystem
and an emptyDir at /tmp for every container that does not mount one itself.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from devstack.oci import (
    DEFAULT_CAPS,
    DEFAULT_PATH,
    RUNC_ROOT,
    ContainerPlan,
    ImageStore,
    Mount,
    container_args,
    host_dir_for_container,
    numeric_user,
    runc_available,
    runc_delete,
    runc_run_argv,
    write_bundle,
)
from devstack.podrunner import LocalPodRunner, PodRun
from devstack.podspec import Launch, NotReady, PodSandbox, expand

CONTAINER_NODE = "container-runner"
CONTAINER_LABEL = "finetune.dev/container-runner"


class ContainerSandbox(PodSandbox):
    def __init__(self, pod: dict, root: Path, kube, service_env: dict[str, str], store: ImageStore,
                 extra_env: dict[str, str], extra_mounts: list[Mount], harden: bool):
        super().__init__(pod, root, kube, base_env={}, service_env=service_env)
        self.store, self.extra_env, self.extra_mounts, self.harden = store, extra_env, extra_mounts, harden
        self.containers: dict[str, Path] = {}  # container id -> its checked-out root filesystem

    def _volume(self, vol: dict) -> Path:
        d = super()._volume(vol)
        if "emptyDir" in vol:
            host_dir_for_container(d)
        return d

    def _security(self, container: dict) -> dict:
        return {**(self.pod["spec"].get("securityContext") or {}), **(container.get("securityContext") or {})}

    def _mounts(self, container: dict) -> list[Mount]:
        memory = {v["name"] for v in self.pod["spec"].get("volumes") or []
                  if (v.get("emptyDir") or {}).get("medium") == "Memory"}
        mounts = []
        for m in container.get("volumeMounts") or []:
            if m["name"] not in self.volume_dirs:
                raise NotReady(f'volume "{m["name"]}" not found in the pod')
            if m["name"] in memory:
                mounts.append(Mount(m["mountPath"]))
                continue
            host = self.volume_dirs[m["name"]] / m.get("subPath", "")
            mounts.append(Mount(m["mountPath"], str(host), bool(m.get("readOnly"))))
        if self.harden and not any(m.destination == "/tmp" for m in mounts):
            tmp = host_dir_for_container(self.root / "volumes" / f"tmp-{container['name']}")
            mounts.append(Mount("/tmp", str(tmp)))
        return [*mounts, *self.extra_mounts]

    def launch(self, container: dict) -> Launch:
        name = container["name"]
        image = container["image"]
        if not self.store.has(image):
            raise NotReady(f'image "{image}" is not in the local store (hack/images.sh builds it)')
        cfg = self.store.config(image)
        sec = self._security(container)
        image_uid, image_gid = numeric_user(cfg.user)
        uid = int(sec.get("runAsUser", image_uid))
        gid = int(sec.get("runAsGroup", image_gid))
        if sec.get("runAsNonRoot") and uid == 0:
            raise NotReady("container has runAsNonRoot and image will run as root")
        groups = [int(g) for g in (self.pod["spec"].get("securityContext") or {}).get("supplementalGroups") or []]
        if "fsGroup" in (self.pod["spec"].get("securityContext") or {}):
            groups.append(int(self.pod["spec"]["securityContext"]["fsGroup"]))
        caps = sec.get("capabilities") or {}
        dropped = {f"CAP_{c}" for c in caps.get("drop") or []}
        keep = [] if "CAP_ALL" in dropped else [c for c in DEFAULT_CAPS if c not in dropped]
        keep += [f"CAP_{c}" for c in caps.get("add") or []]

        cdir = self.root / "containers" / name
        cdir.mkdir(parents=True, exist_ok=True)
        term_path = container.get("terminationMessagePath") or "/dev/termination-log"
        term_file = cdir / "termination-log"
        term_file.write_bytes(b"")
        term_file.chmod(0o666)  # the container's user writes it, as with the kubelet's file

        raw_env = self._env(container)
        # Image ENV first, then what the runtime and the kubelet add, then the pod's own env.
        env = {"PATH": DEFAULT_PATH, **cfg.env, "HOSTNAME": self.pod["metadata"]["name"], **self.extra_env,
               **self.service_env, **raw_env}
        args = [expand(a, raw_env) for a in container_args(cfg, container.get("command"), container.get("args"))]
        cid = f"fto-{self.pod['metadata']['uid'][:8]}-{name}"
        if cid not in self.containers:  # launch is retried while a Secret is missing: check out once
            self.store.release(cid)
            runc_delete(cid)
            self.containers[cid] = self.store.checkout(image, cid)
        plan = ContainerPlan(
            rootfs=str(self.containers[cid]), args=args, env=env, cwd=container.get("workingDir") or cfg.workdir,
            uid=uid, gid=gid, groups=groups,
            read_only_root=bool(sec.get("readOnlyRootFilesystem")) or self.harden,
            mounts=[*self._mounts(container), Mount(term_path, str(term_file))],
            hostname=self.pod["metadata"]["name"][:63],
            no_new_privileges=sec.get("allowPrivilegeEscalation") is False, capabilities=keep,
            cgroup=f"/finetune-operator/{cid}")
        bundle = write_bundle(cdir / "bundle", plan)
        return Launch(name=name, argv=runc_run_argv(bundle, cid), env={"PATH": os.environ.get("PATH", DEFAULT_PATH)},
                      cwd=bundle, termination_file=term_file,
                      termination_policy=container.get("terminationMessagePolicy", "File"),
                      restart_policy=self.pod["spec"].get("restartPolicy", "Always"))

    def close(self) -> None:
        for cid in self.containers:
            runc_delete(cid)
            self.store.release(cid)
        self.containers.clear()


class ContainerPodRunner(LocalPodRunner):
    """Runs the pods bound to node `container-runner` (label finetune.dev/container-runner=true) in runc."""

    def __init__(self, kubeconfig, store: ImageStore | None = None, *, extra_env: dict[str, str] | None = None,
                 extra_mounts: list[Mount] | None = None, harden: bool = False, node_name: str = CONTAINER_NODE,
                 labels: dict[str, str] | None = None, workdir: Path | None = None):
        runc_available()
        super().__init__(kubeconfig, workdir=workdir, node_name=node_name,
                         labels={CONTAINER_LABEL: "true", **(labels or {})})
        self.store = store or ImageStore.from_cache()
        self.container_env = extra_env or {}
        self.extra_mounts = extra_mounts or []
        self.harden = harden

    def _sandbox(self, run: PodRun) -> PodSandbox:
        return ContainerSandbox(run.pod, run.root, self.kube, self.service_env, self.store, self.container_env,
                                self.extra_mounts, self.harden)

    def container_pid(self, namespace: str, pod: str, container: str) -> int | None:
        """The host pid of a running container's first process (for checks from outside)."""
        with self._runs_lock:
            runs = [r for r in self._runs.values() if r.ns == namespace and r.name == pod]
        for run in runs:
            cid = f"fto-{run.uid[:8]}-{container}"
            proc = subprocess.run(["runc", "--root", RUNC_ROOT, "state", cid],
                                  capture_output=True, text=True, check=False)
            if proc.returncode == 0:
                return json.loads(proc.stdout).get("pid")
        return None
