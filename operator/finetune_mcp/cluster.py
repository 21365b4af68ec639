"""The server's Kubernetes calls, made with the caller's identity.

The client comes from the caller's kubeconfig (KUBECONFIG / ~/.kube/config, or --kubeconfig) or, in a
pod, from the server's own ServiceAccount — never from the operator's. RBAC therefore decides what a
caller may do; the server adds a namespace allow-list on top. It touches FinetuneJobs and, for
prepare_dataset, reads dataset ConfigMaps; it never reads Secrets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from finetune_api import GROUP, KIND, PLURAL, VERSION

SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class ClusterError(Exception):
    """An apiserver answer a caller can act on (forbidden, not found, invalid, conflict)."""


def _message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    return str(body.get("message") or exc.reason or exc.status)


def explain(exc: ApiException, what: str) -> ClusterError:
    """The apiserver's own message (422: the field-named admission error), with what was attempted."""
    msg = _message(exc)
    if exc.status == 403:
        return ClusterError(f"forbidden: {msg} (the server acts with the caller's Kubernetes identity; "
                            "that identity lacks this permission)")
    if exc.status == 404:
        return ClusterError(f"{what}: not found")
    if exc.status == 409:
        return ClusterError(f"{what}: {msg}")
    if exc.status == 422:
        return ClusterError(f"{what} rejected by admission: {msg}")
    return ClusterError(f"{what}: apiserver answered {exc.status}: {msg}")


def default_namespace(kubeconfig: str | None = None, context: str | None = None) -> str:
    """The pod's namespace in a cluster, else the kubeconfig context's, else 'default'."""
    if SA_NAMESPACE_FILE.is_file():
        return SA_NAMESPACE_FILE.read_text().strip() or "default"
    try:
        contexts, active = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
        chosen = next((c for c in contexts if c["name"] == context), active) if context else active
        return (chosen or {}).get("context", {}).get("namespace") or "default"
    except (kubernetes.config.ConfigException, FileNotFoundError, TypeError):
        return "default"


def api_client(kubeconfig: str | None = None, context: str | None = None) -> kubernetes.client.ApiClient:
    """In a pod (and no kubeconfig given): the pod's ServiceAccount. Else the caller's kubeconfig."""
    if kubeconfig is None and context is None:
        try:
            config = kubernetes.client.Configuration()
            kubernetes.config.load_incluster_config(client_configuration=config)
            return kubernetes.client.ApiClient(config)
        except kubernetes.config.ConfigException:
            pass
    return kubernetes.config.new_client_from_config(config_file=kubeconfig, context=context)


class Cluster:
    """FinetuneJobs (and dataset ConfigMaps) through one ApiClient; every error becomes a ClusterError."""

    def __init__(self, api: kubernetes.client.ApiClient):
        self.api = api
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.core = kubernetes.client.CoreV1Api(api)

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            raise explain(exc, f"{KIND} {namespace}/{name}") from None

    def list(self, namespace: str | None) -> list[dict[str, Any]]:
        try:
            if namespace is None:
                res = self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
            else:
                res = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        except ApiException as exc:
            raise explain(exc, f"listing {PLURAL}" + (f" in {namespace}" if namespace else "")) from None
        return list(res.get("items") or [])

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"].get("name") or body["metadata"].get("generateName", "") + "…"
        try:
            return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        except ApiException as exc:
            if exc.status == 409:
                raise ClusterError(f"name ({KIND} {namespace}/{name}): already exists; choose another name, or "
                                   "change it with adjust_and_rerun") from None
            raise explain(exc, f"{KIND} {namespace}/{name}") from None

    def patch_spec(self, namespace: str, name: str, spec_patch: dict[str, Any], resource_version: str) -> dict[str, Any]:
        """A JSON merge patch of spec, guarded by resourceVersion: a concurrent edit makes it fail (409)
        instead of being overwritten."""
        body = {"metadata": {"resourceVersion": resource_version}, "spec": spec_patch}
        try:
            return self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body,
                                                              _content_type="application/merge-patch+json")
        except ApiException as exc:
            if exc.status == 409:
                raise ClusterError(f"{KIND} {namespace}/{name} changed while this patch was prepared; "
                                   "read it again (get_status) and retry") from None
            raise explain(exc, f"{KIND} {namespace}/{name}") from None

    def config_map_key(self, namespace: str, name: str, key: str) -> str:
        try:
            cm = self.core.read_namespaced_config_map(name, namespace)
        except ApiException as exc:
            raise explain(exc, f"ConfigMap {namespace}/{name}") from None
        data = cm.data or {}
        if key not in data:
            raise ClusterError(f"dataset_config_map: ConfigMap {namespace}/{name} has no key {key!r} "
                               f"(keys: {', '.join(sorted(data)) or 'none'})")
        return data[key]
