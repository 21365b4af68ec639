"""The server's settings: command-line flags over FINETUNE_MCP_* environment variables (the chart sets these)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ConfigError(ValueError):
    pass


def _truthy(value: str | None) -> bool | None:
    if value is None or value.strip() == "":
        return None
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class McpConfig:
    namespaces: tuple[str, ...]  # allow-list; ("*",) = any namespace the caller's RBAC allows
    default_namespace: str
    transport: str = "stdio"  # stdio or http
    host: str = "127.0.0.1"
    port: int = 8000
    path: str = "/mcp"
    token: str | None = None  # bearer token the HTTP transport requires
    allow_local_paths: bool = True  # prepare_dataset may read paths on this server's disk
    s3_endpoint: str | None = None  # for previewing s3:// datasets with this server's ambient credentials
    poll_seconds: float = 2.0  # how often `wait` reads the FinetuneJob
    pickup_seconds: float = 10.0  # how long a create/patch waits to see the operator start the run
    kubeconfig: str | None = None
    context: str | None = None

    def allows(self, namespace: str) -> bool:
        return "*" in self.namespaces or namespace in self.namespaces

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK

    def check(self) -> McpConfig:
        if self.transport == "http" and not self.token and not self.loopback:
            raise ConfigError(f"refusing to serve HTTP on {self.host} without a bearer token: set FINETUNE_MCP_TOKEN "
                              "or FINETUNE_MCP_TOKEN_FILE, or bind to 127.0.0.1")
        if not self.namespaces:
            raise ConfigError("no namespace is allowed: set FINETUNE_MCP_NAMESPACES (or --namespaces)")
        return self


def read_token(env: dict[str, str]) -> str | None:
    """FINETUNE_MCP_TOKEN, or the file FINETUNE_MCP_TOKEN_FILE names (a mounted Secret key)."""
    if env.get("FINETUNE_MCP_TOKEN"):
        return env["FINETUNE_MCP_TOKEN"].strip()
    path = env.get("FINETUNE_MCP_TOKEN_FILE")
    if path:
        token = Path(path).read_text().strip()
        if not token:
            raise ConfigError(f"FINETUNE_MCP_TOKEN_FILE {path} is empty")
        return token
    return None


def from_env(env: dict[str, str] | None = None, *, fallback_namespace: str = "default", **flags) -> McpConfig:
    """Flags that are not None win over the environment."""
    env = dict(os.environ if env is None else env)
    flags = {k: v for k, v in flags.items() if v is not None}
    transport = flags.get("transport") or env.get("FINETUNE_MCP_TRANSPORT") or "stdio"
    raw_ns = flags.get("namespaces") or env.get("FINETUNE_MCP_NAMESPACES") or ""
    default_ns = flags.get("default_namespace") or env.get("FINETUNE_MCP_DEFAULT_NAMESPACE") or fallback_namespace
    namespaces = tuple(n.strip() for n in raw_ns.split(",") if n.strip()) or (default_ns,)
    if "*" not in namespaces and default_ns not in namespaces:
        default_ns = namespaces[0]
    local = _truthy(env.get("FINETUNE_MCP_ALLOW_LOCAL_PATHS"))
    return McpConfig(
        namespaces=namespaces,
        default_namespace=default_ns,
        transport=transport,
        host=flags.get("host") or env.get("FINETUNE_MCP_HOST") or "127.0.0.1",
        port=int(flags.get("port") or env.get("FINETUNE_MCP_PORT") or 8000),
        path=env.get("FINETUNE_MCP_PATH") or "/mcp",
        token=read_token(env),
        # Over HTTP the caller is remote: its paths are not this machine's, and reading ours is not its business.
        allow_local_paths=(transport == "stdio") if local is None else local,
        s3_endpoint=env.get("FINETUNE_MCP_S3_ENDPOINT") or None,
        poll_seconds=float(env.get("FINETUNE_MCP_POLL_SECONDS") or 2.0),
        pickup_seconds=float(env.get("FINETUNE_MCP_PICKUP_SECONDS") or 10.0),
        kubeconfig=flags.get("kubeconfig"),
        context=flags.get("context"),
    )
