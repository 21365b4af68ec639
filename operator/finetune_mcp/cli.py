"""`finetune-mcp`: the MCP server over stdio (an LLM client starts it) or streamable HTTP.

    finetune-mcp                                   # stdio, kubeconfig's current context and namespace
    finetune-mcp --namespaces ml,ml-dev            # allow these namespaces (the first is the default)
    FINETUNE_MCP_TOKEN=… finetune-mcp --transport http --host 0.0.0.0 --port 8000   # /mcp, bearer token

Settings also come from FINETUNE_MCP_* environment variables (config.py); flags win.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import config as cfg


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="finetune-mcp", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transport", choices=("stdio", "http"), help="stdio (default) or streamable HTTP")
    p.add_argument("--host", help="HTTP bind address (default 127.0.0.1; others need a bearer token)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--namespaces", help="comma-separated namespaces the tools may touch ('*': any the caller's "
                                        "RBAC allows); default: the default namespace only")
    p.add_argument("--default-namespace", help="namespace when a tool call names none (default: the pod's, or "
                                               "the kubeconfig context's)")
    p.add_argument("--kubeconfig", help="kubeconfig of the identity to act as (default: in-cluster, $KUBECONFIG, "
                                        "~/.kube/config)")
    p.add_argument("--context", help="kubeconfig context")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # stdout carries the protocol over stdio: every log line goes to stderr.
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kubernetes.config import ConfigException

    from . import http_transport, server
    from .cluster import Cluster, api_client, default_namespace

    try:
        config = cfg.from_env(
            fallback_namespace=default_namespace(args.kubeconfig, args.context), transport=args.transport,
            host=args.host, port=args.port, namespaces=args.namespaces, default_namespace=args.default_namespace,
            kubeconfig=args.kubeconfig, context=args.context).check()
    except (cfg.ConfigError, OSError) as exc:
        print(f"finetune-mcp: {exc}", file=sys.stderr)
        return 2
    try:
        api = api_client(config.kubeconfig, config.context)
    except ConfigException as exc:
        print(f"finetune-mcp: no Kubernetes identity to act with ({exc}); set KUBECONFIG or --kubeconfig, "
              "or run it in a pod with a ServiceAccount", file=sys.stderr)
        return 2
    mcp = server.build(config, Cluster(api))
    logging.getLogger("finetune_mcp").info("serving %s; namespaces %s (default %s)", config.transport,
                                           ",".join(config.namespaces), config.default_namespace)
    if config.transport == "http":
        http_transport.serve(mcp, config)
    else:
        mcp.run("stdio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
