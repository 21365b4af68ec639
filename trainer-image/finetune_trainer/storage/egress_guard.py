"""The trainer's side of finetune_api.egress: every connection and every local path, checked as used.

`install()` wraps `socket.getaddrinfo`, through which every client in this process resolves a host
before it connects (urllib, botocore/urllib3, huggingface_hub, the Kubernetes client). Addresses a
name resolves to are checked there, and only checked addresses are handed back to connect to, so a
name that resolved to a public address when the operator looked and to 169.254.169.254 now (DNS
rebinding) is refused. The apiserver the trainer reports to is always allowed.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from finetune_api.egress import EgressPolicy, denied_address, host_allowed, under_roots

from ..errors import ConfigError

_original_getaddrinfo = socket.getaddrinfo
last_denial: str | None = None  # the most recent refusal, so a failure it caused is reported as such


class EgressDenied(ConnectionRefusedError):
    """A connection the egress policy refuses (a ConnectionError, so clients fail it like a refused one)."""


def _kube_api_hosts() -> list[str]:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if not host:
        return []
    return [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"] if port else [host]


def install(policy: EgressPolicy) -> None:
    """Process-wide: from now on, resolving a host to an internal address fails unless allowed."""
    allowed = policy.model_copy(update={"allowed_hosts": [*policy.allowed_hosts, *_kube_api_hosts()]})

    def guarded_getaddrinfo(host, port, *args, **kwargs):
        results = _original_getaddrinfo(host, port, *args, **kwargs)
        if host is None:
            return results
        name = host.decode() if isinstance(host, bytes) else str(host)
        try:
            port_number = int(port) if port is not None else None
        except (TypeError, ValueError):
            port_number = None
        if host_allowed(allowed, name, port_number):
            return results
        bad = sorted({r[4][0] for r in results if denied_address(r[4][0])})
        if bad:
            global last_denial
            last_denial = (f"connection to {name} refused: it resolves to the internal address {bad[0]} "
                           "(loopback, link-local, private or reserved); a cluster admin can allow the host "
                           "(Helm value security.egress.allowedHosts)")
            raise EgressDenied(last_denial)
        return results

    socket.getaddrinfo = guarded_getaddrinfo


def uninstall() -> None:
    socket.getaddrinfo = _original_getaddrinfo


def check_local_path(policy: EgressPolicy, field: str, path: str | None) -> None:
    """A spec's local path, resolved (symlinks followed), must stay under an allowed root."""
    if not path or not path.startswith("/"):
        return
    roots = [os.path.realpath(r) for r in policy.local_path_roots]
    real = os.path.realpath(path)
    if not under_roots(real, roots) and not under_roots(str(Path(path)), policy.local_path_roots):
        raise ConfigError("PathNotAllowed", f"{field}: {path} is not under a folder the operator allows "
                                            f"({', '.join(policy.local_path_roots) or 'none'})")
    if not under_roots(real, roots):
        raise ConfigError("PathNotAllowed", f"{field}: {path} leads to {real}, outside the allowed folders")
