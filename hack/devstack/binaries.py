"""Locate the Go-built stack binaries cached by hack/build-stack.sh, building them when missing."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from finetune_trainer.paths import cache_dir  # outside the checkout: a fresh clone reuses it

BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "build-stack.sh"


@dataclass(frozen=True)
class Binaries:
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    etcd: Path
    kwok: Path
    kwokctl: Path
    kwok_stages: Path  # kwok's default Stage YAMLs, copied from its module by the build
    helm: Path

    def all(self) -> list[Path]:
        return list(self.__dict__.values())


def _read_versions(path: Path) -> Binaries | None:
    if not path.exists():
        return None
    dirs = dict(line.split("=", 1) for line in path.read_text().split() if "=" in line)
    try:
        k8s, etcd, kwok, helm = (Path(dirs[k]) for k in ("K8S_BIN", "ETCD_BIN", "KWOK_BIN", "HELM_BIN"))
    except KeyError:
        return None
    bins = Binaries(k8s / "kube-apiserver", k8s / "kube-controller-manager", k8s / "kube-scheduler",
                    etcd / "etcd", kwok / "kwok", kwok / "kwokctl", kwok / "stages", helm / "helm")
    return bins if all(os.access(p, os.X_OK) for p in bins.all()) else None


def ensure() -> Binaries:
    """The cached binaries; runs build-stack.sh (minutes on a cold cache) if any is missing."""
    versions = cache_dir() / "bin" / "versions.env"
    bins = _read_versions(versions)
    if bins:
        return bins
    cache_dir().mkdir(parents=True, exist_ok=True)
    # One builder at a time: parallel pytest sessions on a fresh machine would otherwise race.
    with open(cache_dir() / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        bins = _read_versions(versions)
        if bins:
            return bins
        if not shutil.which("go"):
            raise RuntimeError("the Go toolchain is needed to build the local stack (see DEVELOPERS.md)")
        print(f"devstack: building the local stack with {BUILD_SCRIPT} (first run only)", file=sys.__stderr__)
        # The real stderr (pytest's capture objects may have no fileno): a long first build shows
        # progress instead of hanging silently.
        subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=sys.__stderr__, stderr=sys.__stderr__)
    bins = _read_versions(versions)
    if not bins:
        raise RuntimeError(f"{BUILD_SCRIPT} finished but {versions} does not name every binary")
    return bins
