"""`finetune-operator`: runs the Kopf operator with the settings the Helm chart passes as env."""

from __future__ import annotations

import logging
import os

import kopf

from .config import OperatorConfig


def main() -> None:
    cfg = OperatorConfig.from_env()
    from . import handlers, sweep_handlers  # noqa: F401  (registers the handlers)

    # JSON logs carry the FinetuneJob's namespace/name on every line (log_refkey), for log pipelines.
    fmt = os.environ.get("FINETUNE_LOG_FORMAT", "full").lower()
    kopf.configure(verbose=os.environ.get("FINETUNE_LOG_VERBOSE") == "1",
                   log_format={"json": kopf.LogFormat.JSON, "plain": kopf.LogFormat.PLAIN}.get(fmt, kopf.LogFormat.FULL),
                   log_refkey="finetunejob", log_prefix=fmt != "json")
    # Kopf logs every successful event handler at INFO; those two fire on each progress report.
    logging.getLogger("kopf.objects").addFilter(
        lambda rec: not (rec.getMessage().startswith("Handler '") and "_event' succeeded" in rec.getMessage()))
    liveness = os.environ.get("FINETUNE_LIVENESS_ENDPOINT", "http://0.0.0.0:8081/healthz")

    kopf.run(
        standalone=True,  # no peering CRDs: one replica, restarts are safe by design
        clusterwide=not cfg.watch_namespaces,
        namespaces=cfg.watch_namespaces,
        liveness_endpoint=None if liveness == "off" else liveness,
    )


if __name__ == "__main__":
    main()
