"""Where a training pod may connect and read: the rule the operator checks a spec against and the
trainer enforces at connect time.

A FinetuneJob's URLs (dataset, S3 endpoint) and local paths (dataset, base model, eval data) are
attacker-controlled. By default only public https hosts are reachable: loopback, link-local (cloud
metadata at 169.254.169.254 and fd00:ec2::254), private, shared and reserved ranges are refused, and so
is plain http. A cluster admin opens in-cluster stores by name (Helm values security.egress.*).

The operator can only judge what a URL says (scheme, literal address, obviously internal names); the
trainer judges what a name resolves to, on every connection (`finetune_trainer.storage.egress_guard`), so a
name that resolves to a public address at admission and to an internal one later (DNS rebinding) is
still refused.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from urllib.parse import urlsplit

from pydantic import Field

from .base import ApiModel

# Names that only resolve inside a cluster or a cloud: refused up front unless allowed.
INTERNAL_NAMES = re.compile(r"(^|\.)(localhost|local|internal|svc|cluster\.local|localdomain|home\.arpa)\.?$",
                            re.IGNORECASE)
SHARED_V4 = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT; not "private" to Python < 3.13


class EgressPolicy(ApiModel):
    """What the trainer may reach beyond public https hosts, set by the cluster admin (never by a spec)."""

    allow_http: bool = Field(False, description="Allow plain http:// URLs (datasets, S3 endpoints).")
    allowed_hosts: list[str] = Field(default_factory=list, description=(
        "Hosts reachable even at internal addresses, as host or host:port (e.g. minio.storage.svc:9000). "
        "The operator's default S3 endpoint is always allowed."))
    local_path_roots: list[str] = Field(default_factory=lambda: ["/data/", "/models/", "/mnt/"], description=(
        "Folders a spec's local paths (dataset, base model, eval data) must be under."))


def denied_address(address: str) -> bool:
    """True for every address that is not a public unicast one."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address) and ip in SHARED_V4:
        return True
    return not ip.is_global or ip.is_multicast or ip.is_reserved


def host_allowed(policy: EgressPolicy, host: str, port: int | None) -> bool:
    host = host.lower().rstrip(".").strip("[]")
    for entry in policy.allowed_hosts:
        name, _, want_port = entry.lower().rpartition(":") if _has_port(entry) else (entry.lower(), "", "")
        if name.strip("[]").rstrip(".") == host and (not want_port or port is None or str(port) == want_port):
            return True
    return False


def _has_port(entry: str) -> bool:
    return bool(re.search(r":\d+$", entry)) and (entry.count(":") == 1 or entry.startswith("["))


def url_problem(policy: EgressPolicy, url: str) -> str | None:
    """Why `url` may not be fetched, judged from its text alone; None if it may (the trainer still
    checks where its name resolves)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return f"scheme {parts.scheme!r} is not allowed (https only)"
    if parts.username is not None or parts.password is not None:
        return "credentials in a URL are not allowed (use a Secret reference)"
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        return "invalid port"
    if not host:
        return "no host"
    if host_allowed(policy, host, port or (443 if parts.scheme == "https" else 80)):
        return None
    if parts.scheme == "http" and not policy.allow_http:
        return "plain http is not allowed (https only, unless the operator allows http)"
    if _is_literal_ip(host):
        if denied_address(host):
            return f"{host} is an internal address (loopback, link-local, private or reserved)"
    elif INTERNAL_NAMES.search(host) or "." not in host:
        return f"{host} is an in-cluster or internal name that the operator does not allow"
    return None


def _is_literal_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def local_path_problem(policy: EgressPolicy, path: str) -> str | None:
    """Why a local path may not be read; None if it is under an allowed root (as written: the trainer
    re-checks the resolved path, so a symlink cannot lead out)."""
    norm = posixpath.normpath(path)
    if not path.startswith("/") or norm != path.rstrip("/") and norm != path:
        return "a local path must be absolute and normalized"
    if not under_roots(norm, policy.local_path_roots):
        roots = ", ".join(policy.local_path_roots) or "none"
        return f"{path} is not under a folder the operator allows ({roots})"
    return None


def under_roots(path: str, roots: list[str]) -> bool:
    return any(path == r.rstrip("/") or path.startswith(r.rstrip("/") + "/") for r in roots if r.strip("/"))
