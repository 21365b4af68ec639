"""python -m devstack: start the local stack (cluster + pod runner + S3) and keep it up until Ctrl-C.

    python -m devstack up [--env-file PATH] [--no-s3]

Prints the kubeconfig and S3 endpoint; with --env-file, also writes them as shell exports
(KUBECONFIG, AWS_*), so a demo script can source them once the file appears.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from pathlib import Path

from devstack import LocalCluster, LocalPodRunner, S3Server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start cluster, pod runner and S3; stop on Ctrl-C or SIGTERM")
    up.add_argument("--env-file", type=Path, help="write shell exports for the stack here")
    up.add_argument("--no-s3", action="store_true", help="don't start SeaweedFS")
    args = parser.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    started: list = []
    try:
        cluster = LocalCluster().start()
        started.append(cluster)
        s3 = None if args.no_s3 else S3Server().start()
        if s3:
            started.append(s3)
        runner = LocalPodRunner(cluster.kubeconfig).start()
        started.append(runner)
        exports = {"KUBECONFIG": str(cluster.kubeconfig), **(s3.env() if s3 else {})}
        print(f"cluster up in {cluster.startup_seconds:.1f}s: {cluster.api_url} (logs: {cluster.log_dir})", flush=True)
        print(f"pod runner on node {runner.node_name} (pod logs under {runner.dir / 'logs'})", flush=True)
        for k, v in exports.items():
            print(f"export {k}={shlex.quote(v)}", flush=True)
        if args.env_file:
            tmp = args.env_file.with_suffix(".tmp")
            tmp.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in exports.items()))
            tmp.replace(args.env_file)  # atomic: a waiting script never sources half a file
        stop.wait()
    finally:
        for component in reversed(started):
            component.stop()
        if args.env_file:
            args.env_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
