"""Streamable HTTP with a bearer token.

The token (FINETUNE_MCP_TOKEN, or a mounted Secret key via FINETUNE_MCP_TOKEN_FILE) is compared in
constant time on every request. Without one the server binds only to loopback (config.check refuses
anything else). /healthz answers without a token, and says nothing but "ok", for kubelet probes.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from .config import McpConfig

HEALTH_PATH = "/healthz"


class BearerToken:
    """ASGI middleware: HTTP requests need `Authorization: Bearer <token>`; lifespan events pass through."""

    def __init__(self, app: Any, token: str | None):
        self.app = app
        self.token = token.encode() if token else None

    def _authorized(self, scope: dict[str, Any]) -> bool:
        if self.token is None:
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, value = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self.token)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") == HEALTH_PATH:
            await _respond(send, 200, {"status": "ok"})
            return
        if scope["type"] == "http" and not self._authorized(scope):
            await _respond(send, 401, {"error": "unauthorized", "error_description": "a bearer token is required"},
                           [(b"www-authenticate", b'Bearer realm="finetune-mcp"')])
            return
        await self.app(scope, receive, send)


async def _respond(send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


def app(server: Any, config: McpConfig) -> BearerToken:
    """The MCP server's streamable-HTTP Starlette app behind the bearer-token check."""
    inner = server.streamable_http_app(streamable_http_path=config.path, host=config.host)
    return BearerToken(inner, config.token)


def serve(server: Any, config: McpConfig) -> None:
    import uvicorn

    uvicorn.run(app(server, config), host=config.host, port=config.port, log_level="info",
                # Bodies are small JSON-RPC messages; the server's own limit applies inside.
                proxy_headers=False, server_header=False)
