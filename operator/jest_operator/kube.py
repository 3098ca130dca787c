"""The only module of the operator that talks to the Kubernetes API.

Client: the official ``kubernetes`` Python client (synchronous; the handlers run each reconcile in a worker
thread). Objects travel as plain JSON dicts (``_preload_content=False`` + ``json.loads``), so the pure
modules see exactly what the API server stores, and the client's model classes never lossily re-encode
anything. Patches are JSON merge patches (``application/merge-patch+json``). Kopf itself also talks to the
API (watches, its annotations, and the events posted by ``kopf.info``/``kopf.warn``); those calls are
listed in :data:`REQUIRED_PERMISSIONS` too.

:data:`REQUIRED_PERMISSIONS` is exactly what the operator process calls; the Helm chart's RBAC is derived
from it and a chart test checks coverage, so add a verb here in the same commit as the call.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from typing import Any

from jest_operator.api import GROUP, LABEL_JOB_NAME, LABEL_MANAGED_BY, MANAGED_BY, PLURAL, VERSION

#: (apiGroup, resource, verbs) the operator needs; "" is the core group.
REQUIRED_PERMISSIONS: list[tuple[str, str, tuple[str, ...]]] = [
    # Our custom resource: Kopf lists/watches it and patches its annotations (progress, diff-base); the
    # reconciler GETs it, patches spec.runPolicy.suspend (energy budget) and deletes it (TTL).
    (GROUP, PLURAL, ("get", "list", "watch", "patch", "delete")),
    (GROUP, f"{PLURAL}/status", ("get", "patch")),
    # Children carry ownerReferences with blockOwnerDeletion: true. The OwnerReferencesPermissionEnforcement
    # admission plugin (OpenShift, hardened clusters) lets a client set that only if it may update the
    # owner's finalizers subresource; without this every child create is refused with 403.
    (GROUP, f"{PLURAL}/finalizers", ("update",)),
    # Children: pods are watched (index + events); ConfigMaps and Services are watched too (an index for
    # the desired-state comparison) and patched when they drift from the builders' output.
    ("", "pods", ("get", "list", "watch", "create", "delete")),
    ("", "services", ("get", "list", "watch", "create", "patch", "delete")),
    ("", "configmaps", ("get", "list", "watch", "create", "patch", "delete")),
    # Events posted through Kopf (kopf.info / kopf.warn / kopf.exception).
    ("", "events", ("create",)),
    # Kopf's own needs: resource discovery and namespace scanning.
    ("apiextensions.k8s.io", "customresourcedefinitions", ("list", "watch")),
    ("", "namespaces", ("list", "watch")),
    # Kopf peering (only when the operator runs with --peering; harmless otherwise). The resync loop GETs
    # the same object to stay idle while Kopf has paused this replica.
    ("kopf.dev", "kopfpeerings", ("get", "list", "watch", "patch")),
    ("kopf.dev", "clusterkopfpeerings", ("get", "list", "watch", "patch")),
]

MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT_SECONDS = 10.0


class KubeError(RuntimeError):
    """An API call failed with a status other than the ones the caller tolerates; ``status`` is the HTTP code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def _api_error_status(error: Exception) -> int | None:
    status = getattr(error, "status", None)
    return int(status) if isinstance(status, int) else None


class KubeClient:
    """Thin, typed wrapper over the official client: every call the operator makes, nothing else."""

    def __init__(self, api_client: Any | None = None) -> None:
        from kubernetes import client

        self._client = api_client if api_client is not None else client.ApiClient()
        self._core = client.CoreV1Api(self._client)
        self._custom = client.CustomObjectsApi(self._client)
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls) -> KubeClient:
        """Configure from ``$KUBECONFIG`` (or ``~/.kube/config``) if present, else the in-cluster account."""
        from kubernetes import client, config

        configuration = client.Configuration()
        kubeconfig = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        configuration.connection_pool_maxsize = 32
        return cls(client.ApiClient(configuration))

    # -- reading -------------------------------------------------------------------------------------
    def get_job(self, namespace: str, name: str) -> dict | None:
        """The JESTTrainingJob as stored, or None when it does not exist."""
        return self._read(
            lambda: self._custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT_SECONDS,
            ),
            missing_ok=True,
        )

    def list_pods(self, namespace: str, job_name: str) -> list[dict]:
        """The job's pods, selected by ``jest.training/job-name``."""
        payload = self._read(
            lambda: self._core.list_namespaced_pod(
                namespace, label_selector=_selector(job_name), _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT_SECONDS,
            )
        )
        return _owned_items(payload, job_name)

    def list_children(self, namespace: str, job_name: str) -> list[dict]:
        """The job's ConfigMaps and Services (label-selected; ``kind`` set on each, as LIST items lack it)."""
        found: list[dict] = []
        for kind, lister in (
            ("ConfigMap", self._core.list_namespaced_config_map),
            ("Service", self._core.list_namespaced_service),
        ):
            payload = self._read(
                lambda lister=lister: lister(
                    namespace, label_selector=_selector(job_name), _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT_SECONDS,
                )
            )
            found += [{**item, "kind": kind} for item in _owned_items(payload, job_name)]
        return found

    def get_peering(self, name: str, namespace: str | None) -> dict | None:
        """The KopfPeering (namespaced) or ClusterKopfPeering (namespace None) object, or None when absent."""
        if namespace is None:
            return self._read(
                lambda: self._custom.get_cluster_custom_object(
                    "kopf.dev", "v1", "clusterkopfpeerings", name, _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT_SECONDS,
                ),
                missing_ok=True,
            )
        return self._read(
            lambda: self._custom.get_namespaced_custom_object(
                "kopf.dev", "v1", namespace, "kopfpeerings", name, _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT_SECONDS,
            ),
            missing_ok=True,
        )

    # -- writing -------------------------------------------------------------------------------------
    def create(self, manifest: dict) -> bool:
        """Create a Pod, Service or ConfigMap; True if created, False if it already existed (409)."""
        namespace = manifest["metadata"]["namespace"]
        creators = {
            "Pod": self._core.create_namespaced_pod,
            "Service": self._core.create_namespaced_service,
            "ConfigMap": self._core.create_namespaced_config_map,
        }
        kind = manifest.get("kind", "")
        if kind not in creators:
            raise ValueError(f"kube.create: unsupported kind {kind!r}")
        try:
            creators[kind](namespace, manifest, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_SECONDS)
        except Exception as error:
            if _api_error_status(error) == 409:
                return False
            raise _wrap(error) from error
        return True

    def update(self, manifest: dict) -> None:
        """Bring a ConfigMap/Service back to ``manifest``: merge-patch its labels, annotations and content."""
        metadata = manifest["metadata"]
        patch: dict[str, Any] = {
            "metadata": {"labels": metadata.get("labels") or {}, "annotations": metadata.get("annotations") or {}}
        }
        kind = manifest.get("kind", "")
        if kind == "ConfigMap":
            patcher, patch["data"] = self._core.patch_namespaced_config_map, manifest.get("data") or {}
        elif kind == "Service":
            patcher, patch["spec"] = self._core.patch_namespaced_service, manifest.get("spec") or {}
        else:
            raise ValueError(f"kube.update: unsupported kind {kind!r}")
        self._call(
            lambda: patcher(
                metadata["name"], metadata["namespace"], patch, _content_type=MERGE_PATCH, _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT_SECONDS,
            )
        )

    def delete_child(self, kind: str, namespace: str, name: str) -> bool:
        """Delete a ConfigMap or Service by name; False when it was already gone."""
        deleters = {
            "ConfigMap": self._core.delete_namespaced_config_map,
            "Service": self._core.delete_namespaced_service,
        }
        if kind not in deleters:
            raise ValueError(f"kube.delete_child: unsupported kind {kind!r}")
        return self._delete(
            lambda: deleters[kind](name, namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_SECONDS)
        )

    def delete_pod(self, namespace: str, name: str, grace_seconds: int | None = None) -> bool:
        """Delete a pod (None = its own termination grace period); False when it was already gone."""
        return self._delete(
            lambda: self._core.delete_namespaced_pod(
                name, namespace, grace_period_seconds=grace_seconds, _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT_SECONDS,
            )
        )

    def delete_children(self, namespace: str, job_name: str) -> int:
        """Delete every pod, Service and ConfigMap of the job (where no garbage collector runs); returns the count."""
        deleted = 0
        for pod in self.list_pods(namespace, job_name):
            deleted += self.delete_pod(namespace, pod["metadata"]["name"])
        for lister, deleter in (
            (self._core.list_namespaced_service, self._core.delete_namespaced_service),
            (self._core.list_namespaced_config_map, self._core.delete_namespaced_config_map),
        ):
            payload = self._read(
                lambda lister=lister: lister(
                    namespace, label_selector=_selector(job_name), _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT_SECONDS,
                )
            )
            for item in _owned_items(payload, job_name):
                name = item["metadata"]["name"]
                deleted += self._delete(
                    lambda deleter=deleter, name=name: deleter(
                        name, namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_SECONDS
                    )
                )
        return deleted

    def patch_status(self, namespace: str, name: str, status: dict, *, resource_version: str | None = None) -> str:
        """Merge-patch the status subresource (one call per reconcile); returns the new resourceVersion.

        With ``resource_version`` the patch is conditional: the API server refuses it with 409 (KubeError)
        when the job changed since it was read, so a status computed from a stale read never overwrites a
        newer write; the caller re-reads and re-plans.
        """
        patch: dict[str, Any] = {"status": status}
        if resource_version:
            patch["metadata"] = {"resourceVersion": resource_version}
        stored = self._read(
            lambda: self._custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, patch, _content_type=MERGE_PATCH,
                _preload_content=False, _request_timeout=REQUEST_TIMEOUT_SECONDS,
            )
        )
        return str(((stored or {}).get("metadata") or {}).get("resourceVersion") or "")

    def patch_spec(self, namespace: str, name: str, spec_patch: dict) -> str:
        """Merge-patch ``spec`` (``runPolicy.suspend`` when the energy budget is spent); the new resourceVersion."""
        stored = self._read(
            lambda: self._custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, {"spec": spec_patch}, _content_type=MERGE_PATCH,
                _preload_content=False, _request_timeout=REQUEST_TIMEOUT_SECONDS,
            )
        )
        return str(((stored or {}).get("metadata") or {}).get("resourceVersion") or "")

    def delete_job(self, namespace: str, name: str) -> bool:
        """Delete the JESTTrainingJob (TTL after finishing); False when already gone."""
        return self._delete(
            lambda: self._custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background",
                _preload_content=False, _request_timeout=REQUEST_TIMEOUT_SECONDS,
            )
        )

    # -- plumbing ------------------------------------------------------------------------------------
    def _read(self, call: Any, *, missing_ok: bool = False) -> Any:
        try:
            response = call()
        except Exception as error:
            if missing_ok and _api_error_status(error) == 404:
                return None
            raise _wrap(error) from error
        return json.loads(response.data or b"null")

    def _call(self, call: Any) -> None:
        try:
            call()
        except Exception as error:
            raise _wrap(error) from error

    def _delete(self, call: Any) -> bool:
        try:
            call()
        except Exception as error:
            if _api_error_status(error) == 404:
                return False
            raise _wrap(error) from error
        return True


def _selector(job_name: str) -> str:
    return f"{LABEL_JOB_NAME}={job_name},{LABEL_MANAGED_BY}={MANAGED_BY}"


def _owned_items(payload: Any, job_name: str) -> list[dict]:
    """Items of a list response that really carry the job's labels (defensive against servers ignoring selectors)."""
    items: Iterable[dict] = (payload or {}).get("items") or []
    return [
        item
        for item in items
        if ((item.get("metadata") or {}).get("labels") or {}).get(LABEL_JOB_NAME) == job_name
        and ((item.get("metadata") or {}).get("labels") or {}).get(LABEL_MANAGED_BY) == MANAGED_BY
    ]


def _wrap(error: Exception) -> Exception:
    status = _api_error_status(error)
    if status is None:
        return error
    body = getattr(error, "body", None) or getattr(error, "reason", "") or str(error)
    return KubeError(status, str(body)[:500])
