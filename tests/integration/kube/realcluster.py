"""The operator tests' view of the real control plane (kube-apiserver + etcd + kube-controller-manager).

The cluster comes from the session fixture ``control_plane`` (tests/kube_cluster.py, the same code as
``make cluster-up``); it runs no kubelet, so tests act as one: they bind pods to a Node object, patch the
pods' status subresource, and finish graceful deletions (what a kubelet does once the container exited).

The operator never runs as admin here: :func:`operator_identity` applies the Helm chart's own
ServiceAccount, ClusterRoles and bindings (rendered by the real Helm engine) and mints a token for that
ServiceAccount with the TokenRequest API, so every call the operator makes is authorised by the chart's
RBAC, and OwnerReferencesPermissionEnforcement checks its ``blockOwnerDeletion`` owner references.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from hack.devcluster.controlplane import ControlPlane, render_kubeconfig

from .conftest import REPO, wait_for
from .conftest import job_manifest as emulator_job_manifest

CHART_DIR = REPO / "charts" / "jest-operator"
RELEASE = "jest"
OPERATOR_NAMESPACE = "jest-system"
NODE_NAME = "kubelet-played-by-the-test"
JOBS = "/apis/jest.training/v1alpha1/namespaces/{ns}/jesttrainingjobs"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


@dataclass
class RealCluster:
    """One namespace of the real API server, with the calls the tests make (as admin) and kubectl."""

    cp: ControlPlane
    namespace: str

    # -- plumbing ------------------------------------------------------------------------------------
    def api(self, method: str, path: str, body: object | None = None, *, expect: tuple[int, ...] | None = None,
            content_type: str = "application/json", token: str | None = None) -> tuple[int, Any]:
        status, payload = self.cp.api(method, path, body, content_type=content_type, token=token)
        if expect is not None and status not in expect:
            pytest.fail(f"{method} {path} -> {status} (expected {expect}): {payload}")
        return status, payload

    def kubectl(self, *args: str, check: bool = True, token: str | None = None,
                input_text: str | None = None) -> Any:
        """The real kubectl in this namespace; on failure the test fails with kubectl's own message."""
        result = self.cp.kubectl("-n", self.namespace, *args, check=False, token=token, input=input_text)
        if check and result.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    @property
    def jobs_path(self) -> str:
        return JOBS.format(ns=self.namespace)

    def _selector(self, job_name: str) -> str:
        return "labelSelector=" + urllib.parse.quote(f"jest.training/job-name={job_name}")

    # -- reading -------------------------------------------------------------------------------------
    def job(self, name: str) -> dict | None:
        status, payload = self.api("GET", f"{self.jobs_path}/{name}")
        return None if status == 404 else payload

    def pods(self, job_name: str) -> list[dict]:
        _, payload = self.api("GET", f"/api/v1/namespaces/{self.namespace}/pods?{self._selector(job_name)}",
                              expect=(200,))
        return sorted(payload.get("items", []), key=lambda p: p["metadata"]["name"])

    def pod(self, name: str) -> dict | None:
        status, payload = self.api("GET", f"/api/v1/namespaces/{self.namespace}/pods/{name}")
        return None if status == 404 else payload

    def children(self, plural: str, job_name: str) -> list[dict]:
        _, payload = self.api("GET", f"/api/v1/namespaces/{self.namespace}/{plural}?{self._selector(job_name)}",
                              expect=(200,))
        return payload.get("items", [])

    def events(self, name: str) -> list[dict]:
        _, payload = self.api("GET", f"/api/v1/namespaces/{self.namespace}/events", expect=(200,))
        return [e for e in payload.get("items", []) if (e.get("involvedObject") or {}).get("name") == name]

    # -- writing -------------------------------------------------------------------------------------
    def create_job(self, manifest: dict) -> dict:
        manifest = {**manifest, "metadata": {**manifest["metadata"], "namespace": self.namespace}}
        _, payload = self.api("POST", self.jobs_path, manifest, expect=(201,))
        return payload

    def patch_job(self, name: str, patch: dict, *, subresource: str = "", expect: tuple[int, ...] = (200,)) -> Any:
        path = f"{self.jobs_path}/{name}" + (f"/{subresource}" if subresource else "")
        return self.api("PATCH", path, patch, content_type="application/merge-patch+json", expect=expect)[1]

    def delete_job(self, name: str, *, propagation: str = "Background") -> None:
        self.api("DELETE", f"{self.jobs_path}/{name}", {"propagationPolicy": propagation}, expect=(200, 202))

    def patch_pod(self, name: str, patch: dict, *, subresource: str = "") -> Any:
        path = f"/api/v1/namespaces/{self.namespace}/pods/{name}" + (f"/{subresource}" if subresource else "")
        return self.api("PATCH", path, patch, content_type="application/merge-patch+json", expect=(200,))[1]

    def set_pod_phase(self, name: str, phase: str, *, ready: bool | None = None, reason: str | None = None,
                      message: str | None = None, exit_code: int | None = None) -> None:
        """What a kubelet reports: phase, the Ready condition, and a terminated container for finished pods."""
        ready = phase == "Running" if ready is None else ready
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        status: dict[str, Any] = {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now}],
            "podIP": "127.0.0.1",
        }
        if reason:
            status["reason"] = reason
        if message:
            status["message"] = message
        if phase in ("Succeeded", "Failed"):
            code = exit_code if exit_code is not None else (0 if phase == "Succeeded" else 1)
            status["containerStatuses"] = [{
                "name": "trainer", "image": "jest-trainer:test", "imageID": "", "ready": False, "restartCount": 0,
                "state": {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                         "startedAt": now, "finishedAt": now}},
            }]
        self.patch_pod(name, {"status": status}, subresource="status")

    def ensure_node(self) -> None:
        """A Node object for :meth:`bind` (no kubelet behind it; the test plays the kubelet)."""
        status, _ = self.api("GET", f"/api/v1/nodes/{NODE_NAME}")
        if status == 404:
            self.api("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE_NAME}},
                     expect=(201, 409))

    def bind(self, pod_name: str) -> None:
        """Schedule a pod (what kube-scheduler does): a bound pod gets a graceful deletion, like on a cluster."""
        self.ensure_node()
        self.api("POST", f"/api/v1/namespaces/{self.namespace}/pods/{pod_name}/binding",
                 {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod_name},
                  "target": {"apiVersion": "v1", "kind": "Node", "name": NODE_NAME}}, expect=(201,))

    def evict(self, pod_name: str) -> None:
        """The Eviction API (kubectl drain, cluster autoscaler, Kueue preemption of pods use it)."""
        self.api("POST", f"/api/v1/namespaces/{self.namespace}/pods/{pod_name}/eviction",
                 {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod_name}}, expect=(201,))

    def finish_deletion(self, pod_name: str) -> None:
        """What the kubelet does once the container exited: delete the terminating pod for good."""
        self.api("DELETE", f"/api/v1/namespaces/{self.namespace}/pods/{pod_name}", {"gracePeriodSeconds": 0},
                 expect=(200, 404))

    def run_pods(self, job_name: str, count: int, *, attempt: int | None = None, bind: bool = False) -> list[dict]:
        """Wait for ``count`` pods of the job, (bind and) report them Running; returns them."""
        pods = wait_pods(self, job_name, count, attempt=attempt)
        for pod in pods:
            if bind:
                self.bind(pod["metadata"]["name"])
            self.set_pod_phase(pod["metadata"]["name"], "Running")
        return pods


def phase_of(cluster: RealCluster, name: str) -> str | None:
    return ((cluster.job(name) or {}).get("status") or {}).get("phase")


def wait_phase(cluster: RealCluster, name: str, phase: str, timeout: float = 30) -> dict:
    wait_for(lambda: phase_of(cluster, name) == phase, timeout=timeout, what=f"{name} to be {phase}")
    return cluster.job(name)["status"]


def wait_pods(cluster: RealCluster, name: str, count: int, *, attempt: int | None = None,
              timeout: float = 30) -> list[dict]:
    """Wait until the job has exactly ``count`` live pods (all of ``attempt`` when given); returns them."""

    def ready() -> list[dict] | None:
        pods = [p for p in cluster.pods(name) if not p["metadata"].get("deletionTimestamp")]
        if len(pods) != count or len(cluster.pods(name)) != count:
            return None
        if attempt is not None and any(p["metadata"]["annotations"]["jest.training/attempt"] != str(attempt)
                                       for p in pods):
            return None
        return pods or [{}]

    try:
        found = wait_for(ready, timeout=timeout, what=f"{count} pods of {name} (attempt {attempt})")
    except BaseException:
        job = cluster.job(name) or {}
        print(f"job {name} status: {json.dumps(job.get('status'))}\npods: "
              f"{[(p['metadata']['name'], p['metadata'].get('deletionTimestamp')) for p in cluster.pods(name)]}")
        raise
    return [] if found == [{}] else found


def new_namespace(cp: ControlPlane, prefix: str) -> RealCluster:
    """A fresh namespace whose default ServiceAccount exists (pods are refused until it does)."""
    import uuid

    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cp.kubectl("create", "namespace", name)
    cluster = RealCluster(cp, name)
    wait_for(lambda: cluster.api("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default")[0] == 200,
             timeout=30, what=f"the default ServiceAccount of {name}")
    return cluster


def render_chart(values: dict | None = None) -> list[dict]:
    """Every object the chart renders (the real Helm engine), NOTES.txt left out."""
    import helm_python

    with helm_python.Chart.load(CHART_DIR) as chart:
        rendered = chart.render(dict(values or {}), name=RELEASE, namespace=OPERATOR_NAMESPACE)
    objects: list[dict] = []
    for path, text in rendered.items():
        if not path.endswith("NOTES.txt"):
            objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


@dataclass
class OperatorIdentity:
    """The chart's ServiceAccount: its token and a kubeconfig that authenticates with it."""

    service_account: str
    token: str
    kubeconfig: Path


def operator_identity(cp: ControlPlane, workdir: Path, *, values: dict | None = None,
                      drop_rules: set[tuple[str, str]] | None = None) -> OperatorIdentity:
    """Apply the chart's RBAC (and the CRDs it ships) and mint a ServiceAccount token (TokenRequest API).

    ``drop_rules`` removes (apiGroup, resource) pairs from the rendered roles (to prove a rule is needed).
    """
    objects = render_chart(values)
    status, _ = cp.api("GET", f"/api/v1/namespaces/{OPERATOR_NAMESPACE}")
    if status == 404:
        cp.kubectl("create", "namespace", OPERATOR_NAMESPACE)
    chosen = [o for o in objects if o["kind"] in RBAC_KINDS
              or (o["kind"] == "CustomResourceDefinition" and o["metadata"]["name"].endswith(".kopf.dev")
                  and not drop_rules)]
    suffix = ""
    if drop_rules:
        suffix = "-reduced"
        for obj in chosen:
            obj["metadata"]["name"] += suffix
            if obj["kind"] in ("ClusterRole", "Role"):
                obj["rules"] = [
                    {**rule, "resources": [r for r in rule["resources"]
                                           if not any((g, r) in drop_rules for g in rule["apiGroups"])]}
                    for rule in obj["rules"]
                ]
                obj["rules"] = [rule for rule in obj["rules"] if rule["resources"]]
            if obj["kind"] in ("ClusterRoleBinding", "RoleBinding"):
                obj["roleRef"]["name"] += suffix
                for subject in obj["subjects"]:
                    subject["name"] += suffix
    cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
               input=yaml.safe_dump_all(chosen))
    account = next(o for o in chosen if o["kind"] == "ServiceAccount")["metadata"]["name"]
    wait_for(lambda: cp.kubectl("auth", "can-i", "list", "jesttrainingjobs.jest.training", "-A",
                                f"--as=system:serviceaccount:{OPERATOR_NAMESPACE}:{account}",
                                check=False).returncode == 0 or drop_rules,
             timeout=20, what="the chart's RBAC to be effective")
    token = cp.kubectl("create", "token", account, "-n", OPERATOR_NAMESPACE, "--duration=7200s").stdout.strip()
    kubeconfig = workdir / f"operator{suffix}.kubeconfig"
    kubeconfig.write_text(render_kubeconfig(cp.server, cp.ca_path.read_bytes(), account, token))
    kubeconfig.chmod(0o600)
    return OperatorIdentity(account, token, kubeconfig)


def install_crd(cp: ControlPlane) -> None:
    """Apply the generated CRD (server-side, as a user would) and wait until it is served."""
    applied = cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"), check=False)
    if applied.returncode != 0:
        pytest.fail(f"the API server refused the CRD:\n{applied.stderr}")

    def established() -> bool:
        _, crd = cp.api("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/jesttrainingjobs.jest.training")
        conditions = ((crd if isinstance(crd, dict) else {}).get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)

    wait_for(established, timeout=60, interval=0.2, what="the CRD to be Established")


def job_manifest(name: str, **kwargs: Any) -> dict:
    """The emulator tests' small valid CPU job (2 nodes, digits, few steps), namespace left to the caller."""
    manifest = emulator_job_manifest(name, **kwargs)
    del manifest["metadata"]["namespace"]
    return manifest


def dumps(value: Any) -> str:
    return json.dumps(value)


def apply_crds(cp: ControlPlane, crds: list[dict], *, timeout: float = 60) -> None:
    """Apply CRDs the way a user does (plain ``kubectl apply``, so kubectl checks them against the server's
    OpenAPI; no ``--validate=false``) and wait until the API server serves each one (Established)."""
    applied = cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(crds), check=False)
    if applied.returncode != 0:
        pytest.fail(f"the API server refused the CRDs:\n{applied.stdout}\n{applied.stderr}")

    def established(name: str) -> bool:
        _, crd = cp.api("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        conditions = ((crd if isinstance(crd, dict) else {}).get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)

    for crd in crds:
        name = crd["metadata"]["name"]
        wait_for(lambda name=name: established(name), timeout=timeout, interval=0.2, what=f"CRD {name} Established")


def chart_identity(cp: ControlPlane, workdir: Path, objects: list[dict], *,
                   can_i: tuple[tuple[str, ...], ...]) -> OperatorIdentity:
    """The ServiceAccount and RBAC of *any* rendered release (its own name, namespace and values, e.g. a
    namespaced install), applied as rendered, with a token minted by the TokenRequest API.

    Every namespace the objects live in is created first (a Role needs its namespace). ``can_i`` lists
    ``kubectl auth can-i`` argument tuples that must answer yes for the ServiceAccount before this returns
    (the authorizer's cache lags the apply).
    """
    chosen = [o for o in objects if o["kind"] in RBAC_KINDS]
    for namespace in sorted({o["metadata"]["namespace"] for o in chosen if o["metadata"].get("namespace")}):
        if cp.api("GET", f"/api/v1/namespaces/{namespace}")[0] == 404:
            cp.kubectl("create", "namespace", namespace)
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(chosen))
    account = next(o for o in chosen if o["kind"] == "ServiceAccount")
    name, namespace = account["metadata"]["name"], account["metadata"]["namespace"]
    user = f"system:serviceaccount:{namespace}:{name}"
    for args in can_i:
        wait_for(lambda args=args: cp.kubectl("auth", "can-i", *args, f"--as={user}", check=False).returncode == 0,
                 timeout=20, what=f"RBAC to let {user} {' '.join(args)}")
    token = cp.kubectl("create", "token", name, "-n", namespace, "--duration=7200s").stdout.strip()
    kubeconfig = workdir / f"{namespace}-{name}.kubeconfig"
    kubeconfig.write_text(render_kubeconfig(cp.server, cp.ca_path.read_bytes(), name, token))
    kubeconfig.chmod(0o600)
    return OperatorIdentity(name, token, kubeconfig)
