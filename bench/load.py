"""Load: N FinetuneJobs applied at once against the local stack (real apiserver, kwok nodes).

    .venv/bin/python bench/load.py --jobs 100,500

For each N, in a fresh namespace, with the operator running as a subprocess: creates N FinetuneJobs
as fast as the apiserver takes them (a burst), then — with those N live — 20 more one at a time
(steady state). Reports the time from each create to its Job appearing (seen through a watch) for
both, the operator's RSS and CPU seconds, status writes per second,
apiserver requests per job, and whether any Job was lost or duplicated. Pods go to a node selector
nothing matches, so every run stays live (N live jobs), which is the load the targets speak of.
Not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hack"))

from devstack import LocalCluster  # noqa: E402
from devstack.operator_process import CRD, OperatorProcess, kubectl, wait_for  # noqa: E402


def manifest(name: str) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": name},
            "spec": {"dataset": {"source": "/data/train.jsonl"}, "training": {"maxSteps": 10},
                     "output": {"s3": {"bucket": "models", "endpoint": "http://127.0.0.1:9"}},
                     "resources": {"gpus": 1, "nodeSelector": {"finetune.dev/no-such-node": "true"}}}}


def proc_stats(pid: int) -> tuple[float, float]:
    """(RSS MB, CPU seconds) of a process."""
    rss = next(int(ln.split()[1]) for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
               if ln.startswith("VmRSS")) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return rss, cpu


def apiserver_requests(cluster: LocalCluster) -> int:
    text = subprocess.run(["kubectl", f"--kubeconfig={cluster.kubeconfig}", "get", "--raw", "/metrics"],
                          capture_output=True, text=True).stdout
    return int(sum(float(m) for m in re.findall(r'^apiserver_request_total\{[^}]*\} ([0-9.e+]+)$', text, re.M)))


def run(cluster: LocalCluster, n: int, workers: int, args_steady: int = 20) -> dict:
    import kubernetes

    ns = f"load-{n}"
    kubectl(cluster.kubeconfig, "create", "namespace", ns)
    op = OperatorProcess(cluster.kubeconfig, ns, Path(f"/tmp/fto-load-operator-{n}.log")).start()
    api = kubernetes.config.new_client_from_config(config_file=str(cluster.kubeconfig))
    custom, batch = kubernetes.client.CustomObjectsApi(api), kubernetes.client.BatchV1Api(api)
    time.sleep(3)  # let the operator connect; its startup is not what is measured
    created: dict[str, float] = {}
    job_seen: dict[str, float] = {}
    job_count: dict[str, int] = {}
    status_writes = [0]
    stop = threading.Event()

    def quietly(fn):  # the stream breaks when the cluster stops at the end; that is not news
        def run():
            try:
                fn()
            except Exception:  # noqa: BLE001
                if not stop.is_set():
                    raise
        return run

    @quietly
    def watch_jobs():
        w = kubernetes.watch.Watch()
        for ev in w.stream(batch.list_namespaced_job, ns, timeout_seconds=600):
            owner = ev["object"].metadata.labels.get("finetune.dev/job")
            if ev["type"] == "ADDED" and owner:
                job_seen.setdefault(owner, time.monotonic())
                job_count[owner] = job_count.get(owner, 0) + 1
            if stop.is_set():
                w.stop()

    @quietly
    def watch_ftjs():
        w = kubernetes.watch.Watch()
        for ev in w.stream(custom.list_namespaced_custom_object, "finetune.dev", "v1alpha1", ns, "finetunejobs",
                           timeout_seconds=600):
            if ev["type"] == "MODIFIED":
                status_writes[0] += 1
            if stop.is_set():
                w.stop()

    threads = [threading.Thread(target=f, daemon=True) for f in (watch_jobs, watch_ftjs)]
    for t in threads:
        t.start()
    time.sleep(1)
    req0, (rss0, cpu0) = apiserver_requests(cluster), proc_stats(op.proc.pid)

    def create(i: int) -> None:
        name = f"ftj-{i:04d}"
        custom.create_namespaced_custom_object("finetune.dev", "v1alpha1", ns, "finetunejobs", manifest(name))
        created[name] = time.monotonic()

    t0 = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(create, range(n)))
    apply_s = time.monotonic() - t0
    deadline = time.monotonic() + max(120, n)
    peak_rss = rss0
    while len(job_seen) < n and time.monotonic() < deadline:
        peak_rss = max(peak_rss, proc_stats(op.proc.pid)[0])
        time.sleep(0.5)
    all_jobs_s = time.monotonic() - t0
    time.sleep(5)  # let status writes settle
    # Steady state: with N live jobs, new ones applied one at a time, as a user or Argo CD would.
    steady = []
    for i in range(args_steady):
        name = f"late-{i:03d}"
        create_at = time.monotonic()
        custom.create_namespaced_custom_object("finetune.dev", "v1alpha1", ns, "finetunejobs", manifest(name))
        while name not in job_seen and time.monotonic() - create_at < 30:
            time.sleep(0.01)
        steady.append(job_seen.get(name, time.monotonic()) - create_at)
        time.sleep(0.2)
    rss1, cpu1 = proc_stats(op.proc.pid)
    req1 = apiserver_requests(cluster)
    stop.set()
    op.stop()
    lat = sorted(job_seen[k] - created[k] for k in created if k in job_seen)
    steady.sort()
    dup = sum(1 for c in job_count.values() if c > 1)
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [0] * 99
    return {
        "liveJobs": n, "applySeconds": round(apply_s, 1), "allJobsCreatedSeconds": round(all_jobs_s, 1),
        "jobsCreated": len(job_seen), "lost": n + len(steady) - len(job_seen), "duplicated": dup,
        "burstCreateToJobP50": round(q[49], 3), "burstCreateToJobP99": round(q[98], 3),
        "steadyCreateToJobP50": round(steady[len(steady) // 2], 3), "steadyCreateToJobMax": round(steady[-1], 3),
        "operatorRssMB": round(max(peak_rss, rss1)), "operatorCpuSeconds": round(cpu1 - cpu0, 1),
        "statusWritesPerSecond": round(status_writes[0] / (all_jobs_s + 5), 1),
        "apiserverRequestsPerJob": round((req1 - req0) / n, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", default="100,500")
    p.add_argument("--workers", type=int, default=16, help="parallel creators")
    args = p.parse_args()
    cluster = LocalCluster().start()
    try:
        kubectl(cluster.kubeconfig, "apply", "--server-side", "-f", str(CRD))
        wait_for(lambda: kubectl(cluster.kubeconfig, "get", "ftj", "-A", check=False).returncode == 0, 60, "CRD served")
        for n in (int(x) for x in args.jobs.split(",")):
            print(json.dumps(run(cluster, n, args.workers)), flush=True)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
