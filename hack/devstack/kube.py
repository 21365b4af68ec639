"""A tiny Kubernetes REST client for the harness itself.

The harness deliberately doesn't use the `kubernetes` package the product uses: a bug there must not
be masked (or caused) by the harness that is supposed to test it. Plain dicts, stdlib only.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import yaml


class ApiError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


class Kube:
    def __init__(self, server: str, token: str, ca_file: str | Path):
        self.server = server.rstrip("/")
        self.token = token
        self.ctx = ssl.create_default_context(cafile=str(ca_file))

    @classmethod
    def from_kubeconfig(cls, path: str | Path) -> Kube:
        """Only what LocalCluster writes: one cluster with a CA file, one bearer-token user."""
        cfg = yaml.safe_load(Path(path).read_text())
        ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == cfg["current-context"])
        cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in cfg["users"] if u["name"] == ctx["user"])
        return cls(cluster["server"], user["token"], cluster["certificate-authority"])

    def _open(self, method: str, path: str, body: dict | None, content_type: str, timeout: float):
        req = urllib.request.Request(
            self.server + path, method=method, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": content_type,
                     "Accept": "application/json"})
        try:
            return urllib.request.urlopen(req, context=self.ctx, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise ApiError(e.code, e.read().decode(errors="replace")) from None

    def request(self, method: str, path: str, body: dict | None = None,
                content_type: str = "application/json", timeout: float = 30) -> dict:
        with self._open(method, path, body, content_type, timeout) as resp:
            return json.loads(resp.read() or b"{}")

    def get(self, path: str) -> dict | None:
        try:
            return self.request("GET", path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def post(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def put(self, path: str, body: dict) -> dict:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: dict, kind: str = "strategic-merge-patch") -> dict:
        return self.request("PATCH", path, body, content_type=f"application/{kind}+json")

    def delete(self, path: str, body: dict | None = None) -> dict | None:
        try:
            return self.request("DELETE", path, body)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def watch(self, path: str, resource_version: str, timeout_seconds: int = 30, **params: str) -> Iterator[dict]:
        """Events ({type, object}) until the server ends the watch; the caller relists and rewatches."""
        query = urllib.parse.urlencode({"watch": "1", "resourceVersion": resource_version,
                                        "timeoutSeconds": str(timeout_seconds), "allowWatchBookmarks": "true",
                                        **params})
        with self._open("GET", f"{path}?{query}", None, "application/json", timeout_seconds + 15) as resp:
            for line in resp:
                if line.strip():
                    yield json.loads(line)
