"""Containers from the project's real images, under runc: what a kubelet's container runtime does.

Part of the dev/test harness. hack/images.sh builds the images into a local buildah store (no
registry, no daemon); this module checks an image out of that store as a root filesystem, turns a
pod's container (plus the image's own config) into an OCI runtime spec the way the kubelet and its
CRI runtime would, and runs it with runc:

    store = ImageStore.from_cache()
    rootfs = store.checkout(image, "fto-abc")        # a buildah working container, mounted
    spec = build_runtime_spec(ContainerPlan(...))    # pure: the config.json of the bundle
    runc_run_argv(bundle, "fto-abc")                 # the command that runs it in the foreground

The network namespace is the host's (there is one host and no CNI here): the container reaches the
local apiserver and S3 on loopback, as a pod reaches its cluster's services.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from devstack.image import cache_dir

RUNC_ROOT = "/run/finetune-operator-runc"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# A container's capabilities when its securityContext drops none: the CRI runtimes' default set.
DEFAULT_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
                "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]


class ImagesMissing(RuntimeError):
    """The local image store has not been built (hack/images.sh)."""


@dataclass(frozen=True)
class ImageConfig:
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    user: str
    workdir: str


@dataclass(frozen=True)
class Mount:
    """A bind mount of a host path, or a tmpfs when `source` is None."""

    destination: str
    source: str | None = None
    read_only: bool = False


@dataclass
class ContainerPlan:
    """Everything the runtime spec needs, already resolved (image config merged with the pod's)."""

    rootfs: str
    args: list[str]
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int
    groups: list[int] = field(default_factory=list)
    read_only_root: bool = False
    mounts: list[Mount] = field(default_factory=list)
    hostname: str = "container"
    no_new_privileges: bool = False
    capabilities: list[str] = field(default_factory=lambda: list(DEFAULT_CAPS))
    cgroup: str = ""


class ImageStore:
    """The buildah store hack/images.sh builds into (its images.env names it and the images)."""

    def __init__(self, root: str, runroot: str, images: dict[str, str]):
        self.root, self.runroot, self.images = root, runroot, images

    @classmethod
    def from_cache(cls) -> ImageStore:
        env_file = cache_dir() / "images" / "images.env"
        if not env_file.exists():
            raise ImagesMissing(f"{env_file} is missing: run hack/images.sh (hack/bootstrap.sh does)")
        values = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
        images = {"operator": values["FTO_OPERATOR_IMAGE"], "trainer": values["FTO_TRAINER_IMAGE"]}
        return cls(values["FTO_BUILDAH_ROOT"], values["FTO_BUILDAH_RUNROOT"], images)

    def buildah(self, *args: str) -> str:
        proc = subprocess.run(["buildah", "--root", self.root, "--runroot", self.runroot,
                               "--storage-driver", "overlay", *args], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"buildah {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def has(self, image: str) -> bool:
        try:
            self.buildah("inspect", "--type", "image", image)
        except RuntimeError:
            return False
        return True

    def config(self, image: str) -> ImageConfig:
        info = json.loads(self.buildah("inspect", "--type", "image", image))
        cfg = (info.get("Docker") or {}).get("config") or info["OCIv1"]["config"]
        env = dict(e.split("=", 1) for e in cfg.get("Env") or [])
        return ImageConfig(entrypoint=cfg.get("Entrypoint") or [], cmd=cfg.get("Cmd") or [], env=env,
                           user=cfg.get("User") or "0", workdir=cfg.get("WorkingDir") or "/")

    def checkout(self, image: str, name: str) -> Path:
        """A fresh writable copy of the image's filesystem (the runtime spec may still mount it read-only)."""
        self.buildah("from", "--pull=never", "--name", name, image)
        return Path(self.buildah("mount", name))

    def release(self, name: str) -> None:
        for args in (("umount", name), ("rm", name)):
            with contextlib.suppress(RuntimeError):  # not checked out, or already gone
                self.buildah(*args)


def numeric_user(user: str) -> tuple[int, int]:
    """`USER uid[:gid]` of an image; the project's images use numbers so runAsNonRoot can be checked."""
    uid, _, gid = user.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise ValueError(f"image USER {user!r} is not numeric: runAsNonRoot cannot be verified")
    return int(uid), int(gid or 0)


def container_args(image: ImageConfig, command: list[str] | None, args: list[str] | None) -> list[str]:
    """Kubernetes' rule: command replaces ENTRYPOINT (and drops CMD); args replace CMD."""
    if command:
        return [*command, *(args or [])]
    return [*image.entrypoint, *(args if args else image.cmd)]


def build_runtime_spec(plan: ContainerPlan) -> dict:
    """The OCI runtime spec (config.json) of one container; pure."""
    caps = list(plan.capabilities)
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]
    if not any(m.destination == "/dev/shm" for m in plan.mounts):
        mounts.append({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                       "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]})
    for m in plan.mounts:
        if m.source is None:  # emptyDir with medium Memory, or a tmpfs the caller asks for
            mounts.append({"destination": m.destination, "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "nodev", "mode=1777"]})
        else:
            mounts.append({"destination": m.destination, "type": "bind", "source": m.source,
                           "options": ["rbind", "rprivate", "ro" if m.read_only else "rw"]})
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": plan.uid, "gid": plan.gid, "additionalGids": sorted(set(plan.groups))},
            "args": plan.args,
            "env": [f"{k}={v}" for k, v in plan.env.items()],
            "cwd": plan.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": plan.no_new_privileges,
        },
        "root": {"path": plan.rootfs, "readonly": plan.read_only_root},
        "hostname": plan.hostname,
        "mounts": mounts,
        "linux": {
            # No network namespace: the host's loopback is this single-host cluster's network.
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
            **({"cgroupsPath": plan.cgroup} if plan.cgroup else {}),
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                            "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }


def write_bundle(bundle: Path, plan: ContainerPlan) -> Path:
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(build_runtime_spec(plan), indent=1))
    return bundle


def runc_run_argv(bundle: Path, container_id: str) -> list[str]:
    """runc in the foreground: it forwards the signals it gets to the container and exits with its code."""
    return ["runc", "--root", RUNC_ROOT, "run", "--bundle", str(bundle), container_id]


def runc_delete(container_id: str) -> None:
    subprocess.run(["runc", "--root", RUNC_ROOT, "delete", "--force", container_id],
                   capture_output=True, timeout=60, check=False)


def host_dir_for_container(path: Path, mode: int = 0o777) -> Path:
    """An emptyDir-like host dir: the kubelet makes emptyDirs world-writable, so any uid can use them."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    return path


def runc_available() -> str:
    found = shutil.which("runc")
    if not found:
        raise ImagesMissing("runc is missing: hack/bootstrap.sh installs it (apt-get install runc)")
    return found
