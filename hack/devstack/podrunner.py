"""Local pod runner: a stand-in kubelet that runs the pods bound to one Node as local processes.

Dev/test harness, not product code. These machines have no container runtime, yet tests and the demo
must run the trainer for real, so this registers the Node `local-runner`, keeps it Ready (node status +
Lease heartbeats), watches the pods the real scheduler binds to it, runs each container's
command+args as a process group (see podspec.py for env, volumes and path remapping) and reports
status through pods/status, as the kubelet would. Images are ignored; every pod runs in this venv.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import traceback
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from devstack.image import trainer_image_env
from devstack.kube import ApiError, Kube
from devstack.node import NODE_NAME, RunnerNode
from devstack.node import now as _now
from devstack.podspec import Launch, NotReady, PodSandbox, clean_env
from devstack.procs import tail

MESSAGE_LIMIT = 4096  # the kubelet's cap on a termination message


@dataclass
class ContainerRun:
    launch: Launch
    proc: subprocess.Popen | None = None
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict = field(default_factory=dict)
    restarts: int = 0
    exit_code: int | None = None

    def status(self, image: str) -> dict:
        return {"name": self.launch.name, "image": image, "imageID": "",
                "containerID": f"local://{self.proc.pid}" if self.proc else "",
                "ready": "running" in self.state, "started": "running" in self.state,
                "restartCount": self.restarts, "state": self.state, "lastState": self.last_state}


class PodRun:
    def __init__(self, pod: dict, root: Path, log_path: Path):
        meta = pod["metadata"]
        self.pod, self.ns, self.name, self.uid = pod, meta["namespace"], meta["name"], meta["uid"]
        self.root, self.log_path = root, log_path
        self.lock = threading.RLock()  # guards container state and process start/kill
        self.report_lock = threading.Lock()  # status patches go out one at a time, in order
        self.deleting = threading.Event()
        self.done = threading.Event()
        self.start_time = _now()
        self.init: dict[str, ContainerRun] = {}
        self.main: dict[str, ContainerRun] = {}
        self.waiting: dict | None = None  # why containers haven't started (CreateContainerConfigError)
        self.phase = "Pending"
        self.transitions: dict[str, tuple[str, str]] = {}

    def signal(self, sig: int) -> bool:
        sent = False
        with self.lock:
            for c in [*self.init.values(), *self.main.values()]:
                if c.proc and c.proc.poll() is None:
                    try:
                        os.killpg(c.proc.pid, sig)
                        sent = True
                    except ProcessLookupError:
                        pass
        return sent


class LocalPodRunner:
    def __init__(self, kubeconfig: str | Path, workdir: Path | None = None, extra_env: dict[str, str] | None = None,
                 node_name: str = NODE_NAME, labels: dict[str, str] | None = None):
        self.kube = Kube.from_kubeconfig(kubeconfig)
        self.node_name = node_name
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="fto-runner-"))
        self.keep_workdir = workdir is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        self.runner_log = self.dir / "runner.log"
        api = urllib.parse.urlsplit(self.kube.server)
        # In-cluster clients find the apiserver through these, as in a real pod.
        self.service_env = {"KUBERNETES_SERVICE_HOST": api.hostname, "KUBERNETES_SERVICE_PORT": str(api.port),
                            "KUBERNETES_SERVICE_PORT_HTTPS": str(api.port),
                            "KUBERNETES_PORT": f"tcp://{api.hostname}:{api.port}"}
        # The trainer image's own ENV, then the caller's additions.
        self.base_env = {**clean_env(), **trainer_image_env(), **(extra_env or {})}
        self._runs: dict[str, PodRun] = {}  # by pod uid
        self._service_ports: dict[tuple[str, int], int] = {}  # (headless Service, its port) → a free local port
        self._ports_lock = threading.Lock()
        self._runs_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.node = RunnerNode(self.kube, node_name, labels)

    # --- public ----------------------------------------------------------------------------------
    def start(self) -> LocalPodRunner:
        self.node.register()
        for target in (self._heartbeat_loop, self._watch_loop):
            t = threading.Thread(target=target, name=f"podrunner-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._runs_lock:
            runs = list(self._runs.values())
        for run in runs:
            run.deleting.set()
            run.signal(signal.SIGTERM)
        for run in runs:
            if not run.done.wait(5):
                run.signal(signal.SIGKILL)
                run.done.wait(5)
        if not self.keep_workdir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_path(self, namespace: str, pod: str) -> Path:
        """Stdout+stderr of every container of the pod (appended across restarts)."""
        return self.dir / "logs" / namespace / f"{pod}.log"

    def kill(self, namespace: str, pod: str, sig: int = signal.SIGKILL) -> bool:
        """Signal a running pod's processes (fault drills); the pod then fails like a crashed container."""
        with self._runs_lock:
            runs = [r for r in self._runs.values() if r.ns == namespace and r.name == pod]
        return any(r.signal(sig) for r in runs)

    def log_tails(self, max_bytes: int = 3000, pods: int = 3) -> str:
        with self._runs_lock:
            recent = list(self._runs.values())[-pods:]
        parts = [f"===== pod runner ({self.runner_log}) =====\n{tail(self.runner_log, max_bytes)}"]
        parts += [f"===== pod {r.ns}/{r.name} ({r.log_path}) =====\n{tail(r.log_path, max_bytes)}" for r in recent]
        return "\n".join(parts)

    def service_port(self, service: str, port: int) -> int:
        """The local port standing in for a headless Service's port (ServiceHosts in podspec.py)."""
        with self._ports_lock:
            if (service, port) not in self._service_ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    self._service_ports[(service, port)] = s.getsockname()[1]
            return self._service_ports[(service, port)]

    def _log(self, msg: str) -> None:
        with open(self.runner_log, "a") as f:
            f.write(f"{_now(micro=True)} {msg}\n")

    # --- node ------------------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(10):
            try:
                self.node.heartbeat()
            except Exception as e:  # a missed beat is retried; the lease tolerates a few
                self._log(f"heartbeat failed: {e!r}")

    # --- pod events ------------------------------------------------------------------------------
    def _watch_loop(self) -> None:
        selector = f"spec.nodeName={self.node_name}"
        while not self._stop.is_set():
            try:
                # List, reconcile, then watch until the server closes; any error just relists.
                listing = self.kube.request("GET", "/api/v1/pods?" + urllib.parse.urlencode({"fieldSelector": selector}))
                present = {p["metadata"]["uid"] for p in listing["items"]}
                for pod in listing["items"]:
                    self._on_pod(pod)
                with self._runs_lock:
                    gone = [uid for uid in self._runs if uid not in present]
                for uid in gone:
                    self._on_gone(uid)
                rv = listing["metadata"]["resourceVersion"]
                for event in self.kube.watch("/api/v1/pods", rv, timeout_seconds=15, fieldSelector=selector):
                    if self._stop.is_set() or event["type"] == "ERROR":
                        break
                    if event["type"] == "DELETED":
                        self._on_gone(event["object"]["metadata"]["uid"])
                    elif event["type"] in ("ADDED", "MODIFIED"):
                        self._on_pod(event["object"])
            except Exception as e:
                if not self._stop.is_set():
                    self._log(f"watch failed, relisting: {e!r}")
                    self._stop.wait(0.5)

    def _on_pod(self, pod: dict) -> None:
        meta = pod["metadata"]
        with self._runs_lock:
            run = self._runs.get(meta["uid"])
            if run is None:
                if meta.get("deletionTimestamp"):
                    # Never ran here (or ran before a restart): nothing to stop, confirm the deletion.
                    self._spawn(self._confirm_delete, meta["namespace"], meta["name"], meta["uid"])
                    return
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    return
                key = f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
                run = PodRun(pod, self.dir / "pods" / key, self.log_path(meta["namespace"], meta["name"]))
                self._runs[run.uid] = run
                self._spawn(self._run_pod, run)
                return
        if meta.get("deletionTimestamp") and not run.deleting.is_set():
            run.deleting.set()
            grace = meta.get("deletionGracePeriodSeconds")
            if grace is None:
                grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
            self._spawn(self._terminate, run, grace)

    def _on_gone(self, uid: str) -> None:
        with self._runs_lock:
            run = self._runs.pop(uid, None)
        if run and not run.done.is_set():
            # Force-deleted while running: stop the processes, there is no pod left to report to.
            run.deleting.set()
            self._spawn(self._kill, run, 2)

    def _spawn(self, target, *args) -> None:
        threading.Thread(target=target, args=args, name=f"podrunner-{target.__name__}", daemon=True).start()

    # --- termination -----------------------------------------------------------------------------
    def _kill(self, run: PodRun, grace: float) -> None:
        run.signal(signal.SIGTERM)
        if not run.done.wait(grace):
            run.signal(signal.SIGKILL)
            run.done.wait(10)

    def _terminate(self, run: PodRun, grace: float) -> None:
        self._log(f"terminating {run.ns}/{run.name} (grace {grace}s)")
        self._kill(run, grace)
        self._confirm_delete(run.ns, run.name, run.uid)

    def _confirm_delete(self, ns: str, name: str, uid: str) -> None:
        # What the kubelet does once containers are gone: the final, immediate delete.
        try:
            self.kube.delete(f"/api/v1/namespaces/{ns}/pods/{name}",
                             {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}})
        except ApiError as e:
            if e.status != 409:  # 409: a newer pod of that name; not ours to delete
                self._log(f"delete {ns}/{name} failed: {e}")

    # --- running ---------------------------------------------------------------------------------
    def _sandbox(self, run: PodRun) -> PodSandbox:
        """How this runner turns the pod's containers into processes (devstack.containers: in runc)."""
        return PodSandbox(run.pod, run.root, self.kube, self.base_env, self.service_env,
                          lambda service, port: self.service_port(f"{run.ns}/{service}", port))

    def _run_pod(self, run: PodRun) -> None:
        sandbox = None
        try:
            self._log(f"starting {run.ns}/{run.name}")
            run.log_path.parent.mkdir(parents=True, exist_ok=True)
            sandbox = self._sandbox(run)
            spec = run.pod["spec"]
            while not run.deleting.is_set():
                try:
                    sandbox.materialise_volumes()
                    inits = [sandbox.launch(c) for c in spec.get("initContainers") or []]
                    mains = [sandbox.launch(c) for c in spec["containers"]]
                    break
                except (NotReady, ApiError, OSError) as e:  # like the kubelet: report, retry until it works
                    run.waiting = {"reason": "CreateContainerConfigError", "message": str(e)}
                    self._report(run)
                    run.deleting.wait(1)
            else:
                return
            run.waiting = None
            run.init = {launch.name: ContainerRun(launch) for launch in inits}
            run.main = {launch.name: ContainerRun(launch) for launch in mains}
            for c in run.init.values():
                if self._run_container(run, c, init=True) != 0:
                    run.phase = "Failed"
                    self._report(run)
                    return
            threads = [threading.Thread(target=self._run_container, args=(run, c), daemon=True)
                       for c in run.main.values()]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            codes = [c.exit_code for c in run.main.values()]
            run.phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
            self._log(f"{run.ns}/{run.name} {run.phase} (exit codes {codes})")
            self._report(run)
        except Exception:
            self._log(f"{run.ns}/{run.name} runner error:\n{traceback.format_exc()}")
        finally:
            if sandbox is not None:
                sandbox.close()
            run.done.set()

    def _run_container(self, run: PodRun, c: ContainerRun, init: bool = False) -> int:
        launch = c.launch
        while True:
            with run.lock:
                if run.deleting.is_set():
                    c.exit_code = c.exit_code if c.exit_code is not None else 137
                    return c.exit_code
                self._log(f"{run.ns}/{run.name}/{launch.name}: {launch.argv} in {launch.cwd}")
                with open(run.log_path, "ab") as log:
                    try:
                        if not launch.argv:
                            raise OSError("no command: the local pod runner ignores images, so it needs command/args")
                        c.proc = subprocess.Popen(launch.argv, env=launch.env, cwd=launch.cwd, stdout=log,
                                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                  start_new_session=True)
                    except OSError as e:  # e.g. command not found: the kubelet's StartError, exit 128
                        log.write(f"{e}\n".encode())
                        c.proc = None
                started = _now()
                if c.proc:
                    c.state = {"running": {"startedAt": started}}
            if c.proc:
                self._report(run)
                rc = c.proc.wait()
                # As when a container's main process ends: whatever it left running in its group dies too.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                code = rc if rc >= 0 else 128 - rc  # killed by a signal: 128+n, as containers report it
            else:
                code = 128
            c.exit_code = code
            c.state = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                      "message": self._message(run, launch, code), "startedAt": started,
                                      "finishedAt": _now(), "containerID": f"local://{c.proc.pid}" if c.proc else ""}}
            policy = launch.restart_policy
            if run.deleting.is_set() or policy == "Never" or (code == 0 and (init or policy != "Always")):
                return code
            c.last_state, c.restarts = c.state, c.restarts + 1
            self._report(run)
            run.deleting.wait(min(10, 2 ** c.restarts))  # crash-loop back-off, shortened

    @staticmethod
    def _message(run: PodRun, launch: Launch, code: int) -> str:
        data = launch.termination_file.read_bytes()[:MESSAGE_LIMIT]
        if not data and code != 0 and launch.termination_policy == "FallbackToLogsOnError":
            data = tail(run.log_path, 2048).encode()
        return data.decode(errors="replace")

    # --- status ----------------------------------------------------------------------------------
    def _condition(self, run: PodRun, type_: str, ok: bool, reason: str | None = None) -> dict:
        status = "True" if ok else "False"
        prev = run.transitions.get(type_)
        since = prev[1] if prev and prev[0] == status else _now()
        run.transitions[type_] = (status, since)
        # reason None is sent as null: the merge patch must clear a reason from an earlier report.
        return {"type": type_, "status": status, "lastTransitionTime": since, "lastProbeTime": None, "reason": reason}

    def _report(self, run: PodRun) -> None:
        # Built and sent under one lock: a stale "Running" must never land after "Succeeded".
        with run.report_lock:
            with run.lock:
                body = self._status(run)
            for attempt in range(5):
                try:
                    self.kube.patch(f"/api/v1/namespaces/{run.ns}/pods/{run.name}/status", body)
                    return
                except ApiError as e:
                    if e.status in (404, 409, 422) or attempt == 4:
                        self._log(f"status of {run.ns}/{run.name} not written: {e}")
                        return
                except OSError as e:
                    self._log(f"status of {run.ns}/{run.name}: {e!r}, retrying")
                time.sleep(0.5)

    def _status(self, run: PodRun) -> dict:
        spec = run.pod["spec"]
        images = {c["name"]: c.get("image", "") for c in [*(spec.get("initContainers") or []), *spec["containers"]]}
        terminal = run.phase in ("Succeeded", "Failed")
        mains = [c.status(images[n]) for n, c in run.main.items()]
        if run.waiting or not mains:
            mains = [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
                      "started": False, "restartCount": 0,
                      "state": {"waiting": run.waiting or {"reason": "PodInitializing"}}} for c in spec["containers"]]
        inits_done = all(c.exit_code == 0 for c in run.init.values()) and not run.waiting and bool(run.main)
        all_ready = bool(mains) and all(s["ready"] for s in mains)
        if run.phase == "Pending" and any("running" in s["state"] or "terminated" in s["state"] for s in mains):
            run.phase = "Running"
        reason = "PodCompleted" if terminal else (None if all_ready else "ContainersNotReady")
        status = {
            "phase": run.phase, "startTime": run.start_time,
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "conditions": [
                self._condition(run, "PodReadyToStartContainers", True),
                self._condition(run, "Initialized", inits_done or terminal),
                self._condition(run, "ContainersReady", all_ready, reason),
                self._condition(run, "Ready", all_ready, reason),
            ],
            "containerStatuses": mains,
        }
        if spec.get("initContainers"):
            status["initContainerStatuses"] = [
                run.init[c["name"]].status(c.get("image", "")) if c["name"] in run.init else
                {"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
                 "restartCount": 0, "state": {"waiting": run.waiting or {"reason": "PodInitializing"}}}
                for c in spec["initContainers"]]
        # uid in the patch is a precondition: never write onto a newer pod of the same name.
        return {"metadata": {"uid": run.uid}, "status": status}
