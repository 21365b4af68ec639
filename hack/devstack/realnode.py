"""A real node for the local control plane: kubelet + containerd + a CNI bridge, beside the kwok nodes.

Dev/test harness. hack/real-node.sh provides the pieces (kubelet built from the control plane's own
Kubernetes tree, containerd and CNI plugins from Debian, a locally compiled pause image); this
starts them against a LocalCluster's kubeconfig and registers node `fto-real-node` (labels
finetune.dev/real-node=true, type=cpu). What this machine needs beyond a stock setup, each found by
running it here:

- `failCgroupV1: false`: kubelet 1.36 refuses cgroup v1 hosts otherwise;
- `restrict_oom_score_adj = true` in containerd's CRI config: the sandbox may not lower
  oom_score_adj (writing -998 gives "Permission denied", even as root), which fails every pod
  sandbox with runc's "can't get final child's PID from pipe: EOF";
- the pause image is compiled locally and named in `sandbox_image` (no registry);
- the CNI plugins live in /usr/lib/cni (Debian), not /opt/cni/bin.

Pods get addresses on the bridge (10.244.0.0/24); the local apiserver and S3 listen on loopback
only, and there is no kube-proxy. forward_to_loopback() gives pods a way in, as a cluster's Service
network would: DNAT from the bridge to 127.0.0.1 (route_localnet on the bridge only), for the
`kubernetes` Service's ClusterIP (the kubelet's KUBERNETES_SERVICE_HOST; the apiserver's
self-signed certificate names it) and for S3 at the bridge's gateway address. See docs/images.md.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import tempfile
from pathlib import Path

from devstack.image import cache_dir
from devstack.kube import Kube
from devstack.oci import ImageStore
from devstack.procs import Proc, free_port, wait_until

NODE = "fto-real-node"
LABELS = {"finetune.dev/real-node": "true", "type": "cpu"}
K8S_VERSION = "1.36.3"
PAUSE = "localhost/fto/pause:3.6"
POD_SUBNET = "10.244.0.0/24"
BRIDGE = "fto0"
GATEWAY = "10.244.0.1"  # the bridge's address on the host, the pods' default route


def containerd_config(default: str, root: Path, state: Path, sock: Path, cni_conf: Path) -> str:
    """containerd's default config with this node's paths and the settings this machine needs."""
    subs = [
        (r'(?m)^root = .*$', f'root = "{root}"'),
        (r'(?m)^state = .*$', f'state = "{state}"'),
        (r'address = "/run/containerd/containerd.sock"', f'address = "{sock}"'),
        (r'bin_dir = "/opt/cni/bin"', 'bin_dir = "/usr/lib/cni"'),
        (r'conf_dir = "/etc/cni/net.d"', f'conf_dir = "{cni_conf}"'),
        (r'restrict_oom_score_adj = false', 'restrict_oom_score_adj = true'),
        (r'sandbox_image = ".*"', f'sandbox_image = "{PAUSE}"'),
    ]
    for pattern, value in subs:
        default, n = re.subn(pattern, value, default)
        if n == 0:
            raise RuntimeError(f"containerd's default config has no {pattern!r}: another containerd version?")
    return default


def cni_conflist() -> dict:
    return {"cniVersion": "1.0.0", "name": "fto-pods", "plugins": [
        {"type": "bridge", "bridge": "fto0", "isGateway": True, "ipMasq": True,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]], "routes": [{"dst": "0.0.0.0/0"}]}},
        {"type": "portmap", "capabilities": {"portMappings": True}}]}


def kubelet_config(sock: Path, port: int) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{sock}",
        "address": "127.0.0.1", "port": port, "readOnlyPort": 0, "healthzPort": 0,
        # No QoS cgroup tree or allocatable enforcement: the host's cgroups are not the kubelet's.
        "cgroupsPerQOS": False, "enforceNodeAllocatable": [],
        # The disk is the dev machine's, shared with builds: the default thresholds (imagefs 15 %
        # free) put the node under DiskPressure and evicted the tests' pods. Nor may image GC
        # delete the images imported for the tests.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
    }


class RealNode:
    def __init__(self, kubeconfig: str | Path, store: ImageStore | None = None, workdir: Path | None = None):
        self.kubeconfig = Path(kubeconfig)
        self.kube = Kube.from_kubeconfig(kubeconfig)
        self.store = store or ImageStore.from_cache()
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="fto-realnode-"))
        self.root = cache_dir() / "containerd" / "root"  # imported images survive between sessions
        self.state = Path("/run/fto-containerd")
        self.sock = self.state / "containerd.sock"
        self.kubelet_bin = cache_dir() / "bin" / f"kubelet-{K8S_VERSION}" / "kubelet"
        self.procs: list[Proc] = []
        self._nat_rules: list[list[str]] = []

    def ctr(self, *args: str, timeout: float = 600) -> str:
        proc = subprocess.run(["ctr", "-a", str(self.sock), "-n", "k8s.io", *args], capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def start(self) -> RealNode:
        if not self.kubelet_bin.exists():
            raise RuntimeError(f"{self.kubelet_bin} is missing: run hack/real-node.sh (hack/bootstrap.sh does)")
        logs = self.dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        cni = self.dir / "net.d"
        cni.mkdir(exist_ok=True)
        (cni / "10-fto.conflist").write_text(json.dumps(cni_conflist()))
        self._bridge()
        default = subprocess.run(["containerd", "config", "default"], capture_output=True, text=True, check=True).stdout
        config = self.dir / "containerd.toml"
        config.write_text(containerd_config(default, self.root, self.state / "state", self.sock, cni))
        self.procs.append(Proc("containerd", ["containerd", "--config", str(config)], logs))
        wait_until(lambda: self.procs[0].check_alive() and self.sock.exists(), 60, "containerd's socket")
        self.load_image(PAUSE)
        kcfg = self.dir / "kubelet.yaml"
        kcfg.write_text(json.dumps(kubelet_config(self.sock, free_port())))
        labels = ",".join(f"{k}={v}" for k, v in LABELS.items())
        self.procs.append(Proc("kubelet", [str(self.kubelet_bin), "--config", str(kcfg),
                                           "--kubeconfig", str(self.kubeconfig), "--root-dir", str(self.dir / "kubelet"),
                                           "--cert-dir", str(self.dir / "pki"), "--hostname-override", NODE,
                                           f"--node-labels={labels}", "--v=1"], logs))
        wait_until(lambda: self.procs[1].check_alive() and self.ready(), 180, f"node {NODE} Ready")
        return self

    def _bridge(self) -> None:
        """The CNI bridge, made before the first pod (the plugin adopts it) so that loopback routing can be
        allowed on it alone rather than on every interface of the host."""
        if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0:
            subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True, capture_output=True)
        subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True, capture_output=True)
        Path(f"/proc/sys/net/ipv4/conf/{BRIDGE}/route_localnet").write_text("1")

    def forward_to_loopback(self, ip: str, port: int, local_port: int) -> None:
        """Connections from pods (and from this host) to ip:port reach 127.0.0.1:local_port."""
        match = ["-d", f"{ip}/32", "-p", "tcp", "--dport", str(port), "-m", "comment", "--comment", NODE]
        target = ["-j", "DNAT", "--to-destination", f"127.0.0.1:{local_port}"]
        for chain in (["PREROUTING", "-i", BRIDGE], ["OUTPUT"]):
            rule = ["-t", "nat", "-A", chain[0], *chain[1:], *match, *target]
            subprocess.run(["iptables", *rule], check=True, capture_output=True)
            self._nat_rules.append(rule)

    def ready(self) -> bool:
        node = self.kube.get(f"/api/v1/nodes/{NODE}") or {}
        return any(c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", []))

    def load_image(self, ref: str) -> None:
        """Copy an image from the buildah store into containerd (no registry between them)."""
        if ref in self.ctr("images", "ls", "-q").split():
            local = json.loads(self.store.buildah("inspect", "--type", "image", ref))["FromImageID"]
            if local in self.ctr("images", "ls").replace("sha256:", ""):
                return
        archive = self.dir / "image.tar"
        self.store.buildah("push", ref, f"docker-archive:{archive}:{ref}")
        try:
            self.ctr("image", "import", str(archive))
        finally:
            archive.unlink(missing_ok=True)

    def pod_log(self, namespace: str, pod: str, container: str) -> str:
        """The container's log as the kubelet wrote it (the apiserver cannot reach this kubelet by name)."""
        files = sorted(Path("/var/log/pods").glob(f"{namespace}_{pod}_*/{container}/*.log"))
        return "".join(f.read_text(errors="replace") for f in files)

    def stop(self) -> None:
        for rule in reversed(self._nat_rules):
            subprocess.run(["iptables", *[("-D" if a == "-A" else a) for a in rule]], capture_output=True, check=False)
        self._nat_rules.clear()
        for proc in reversed(self.procs[1:]):  # kubelet first: it would restart what containerd stops
            proc.stop()
        if self.procs:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                for cid in self.ctr("tasks", "ls", "-q", timeout=30).split():
                    subprocess.run(["ctr", "-a", str(self.sock), "-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", cid],
                                   capture_output=True, timeout=30, check=False)
            self.procs[0].stop()
        self.procs.clear()
        # The kubelet makes its root dir a mount point and mounts pod volumes (tmpfs tokens) under it.
        subprocess.run(["umount", "-R", str(self.dir / "kubelet")], capture_output=True, timeout=60, check=False)
        with contextlib.suppress(Exception):  # the cluster may already be gone
            self.kube.delete(f"/api/v1/nodes/{NODE}", {})
