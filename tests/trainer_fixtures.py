"""Fixtures for the trainer tests: offline mode, rows, the trainer's env, a run of `finetune`. The
tiny models themselves are built by devstack.models (the demo and the benchmarks use them too)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "UNSLOTH_DISABLE_STATISTICS": "1", "TOKENIZERS_PARALLELISM": "false"}
# huggingface_hub and datasets read offline mode once, at import: set it before any test imports them.
for _name, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_name, _value)

# After offline mode is set; the tests import them from here.
from devstack.models import gemma_tokenizer_dir, real_gguf, save_with_gemma_tokenizer, tiny_gemma  # noqa: E402,F401


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------- data
ALPACA_ROWS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "Translate to German.", "input": "Good morning", "output": "Guten Morgen."},
    {"instruction": "Name a primary color.", "input": "", "output": "Red is a primary color."},
    {"instruction": "What is two plus two?", "input": "", "output": "Two plus two is four."},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def offline_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **OFFLINE_ENV, **extra}


def trainer_env(s3, termination_log: Path) -> dict[str, str]:
    """The variables a trainer pod runs with: offline, S3 credentials from the Secret, a termination log."""
    return {**OFFLINE_ENV, "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            "FINETUNE_TERMINATION_LOG": str(termination_log)}


def run_job(job: dict, root: Path, command: str = "run") -> tuple[int, Path, Path]:
    """`finetune <command>` on a FinetuneJob, as its pod would: returns (exit code, config, workdir)."""
    import yaml

    from finetune_trainer.cli import main

    config = root / "job.yaml"
    config.write_text(yaml.safe_dump(job))
    workdir = root / "work"
    return main([command, "--config", str(config), "--workdir", str(workdir)]), config, workdir


# ------------------------------------------------------------------ a fake apiserver (HTTPS)
class FakeApiServer:
    """Records the trainer's status patches; answers each with the next queued status (default 200).

    It speaks HTTPS with a self-signed certificate for 127.0.0.1, and writes a service-account folder
    (token, ca.crt, namespace) the way the kubelet mounts one, so the trainer's real client code runs.
    """

    def __init__(self, workdir: Path, token: str = "sa-token-1"):
        import subprocess

        self.dir = workdir
        self.sa_dir = workdir / "serviceaccount"
        self.sa_dir.mkdir(parents=True, exist_ok=True)
        key, cert = workdir / "tls.key", workdir / "tls.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        shutil.copyfile(cert, self.sa_dir / "ca.crt")
        (self.sa_dir / "token").write_text(token)
        (self.sa_dir / "namespace").write_text("default")
        self.requests: list[dict] = []
        self.responses: list[int] = []
        self._cert, self._key = cert, key
        self._server = None

    def start(self) -> FakeApiServer:
        import http.server
        import ssl
        import threading

        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PATCH(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.requests.append({"method": "PATCH", "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                      "body": json.loads(body or b"null")})
                status = fake.responses.pop(0) if fake.responses else 200
                payload = json.dumps({"kind": "Status", "code": status} if status >= 400 else {"kind": "FinetuneJob"})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload.encode())

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self._cert), str(self._key))
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def env(self, name: str, namespace: str = "default", run: int = 1) -> dict[str, str]:
        """What the operator's Job builder sets in the training container."""
        return {"FINETUNE_JOB_NAME": name, "FINETUNE_JOB_NAMESPACE": namespace, "FINETUNE_RUN": str(run),
                "FINETUNE_SERVICEACCOUNT_DIR": str(self.sa_dir), "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": str(self.port)}

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
