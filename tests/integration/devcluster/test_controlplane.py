"""The real control plane does what the operator's tests rely on: it serves, enforces RBAC and admission,
and its controller manager runs the garbage collector and the Deployment/ReplicaSet controllers."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable

import pytest

from hack.devcluster.controlplane import ControlPlane

pytestmark = pytest.mark.slow

K8S_VERSION = "v1.37.2"


def eventually(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` (controllers act asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def service_account_token(cp: ControlPlane, namespace: str, name: str) -> str:
    """Create a ServiceAccount and get a token for it from the TokenRequest API (`kubectl create token`)."""
    cp.kubectl("create", "serviceaccount", name, "-n", namespace)
    return cp.kubectl("create", "token", name, "-n", namespace, "--duration=10m").stdout.strip()


def test_server_is_ready_and_reports_the_pinned_release(control_plane: ControlPlane) -> None:
    status, body = control_plane.api("GET", "/readyz")
    assert (status, body) == (200, "ok")
    status, version = control_plane.api("GET", "/version")
    assert status == 200
    assert version["gitVersion"] == K8S_VERSION


def test_kubectl_version_and_admin_can_do_anything(control_plane: ControlPlane) -> None:
    out = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert out["serverVersion"]["gitVersion"] == K8S_VERSION
    assert control_plane.kubectl("auth", "can-i", "*", "*", "--all-namespaces").stdout.strip() == "yes"


def test_anonymous_and_unknown_tokens_are_refused(control_plane: ControlPlane) -> None:
    status, _ = control_plane.api("GET", "/api/v1/namespaces/default/pods", token="not-a-token")
    assert status == 401


def test_rbac_refuses_a_service_account_until_a_role_allows_it(control_plane: ControlPlane,
                                                                 kube_namespace: str) -> None:
    ns = kube_namespace
    token = service_account_token(control_plane, ns, "reader")
    refused = control_plane.kubectl("get", "pods", "-n", ns, token=token, check=False)
    assert refused.returncode != 0
    assert "forbidden" in refused.stderr.lower()
    assert f"system:serviceaccount:{ns}:reader" in refused.stderr

    control_plane.kubectl("create", "role", "pod-reader", "--verb=list,get", "--resource=pods", "-n", ns)
    control_plane.kubectl("create", "rolebinding", "reader", "--role=pod-reader",
                          f"--serviceaccount={ns}:reader", "-n", ns)
    eventually(lambda: control_plane.kubectl("get", "pods", "-n", ns, token=token, check=False).returncode == 0,
               "the RoleBinding to take effect")
    # The grant is exactly what the Role says: other namespaces and other verbs stay refused.
    assert control_plane.kubectl("get", "pods", "-n", "default", token=token, check=False).returncode != 0
    assert control_plane.kubectl("auth", "can-i", "delete", "pods", "-n", ns, token=token,
                                 check=False).stdout.strip() == "no"


def _configmap(name: str, owner: dict | None = None, *, block: bool = False) -> dict:
    meta: dict = {"name": name}
    if owner is not None:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap", "name": owner["metadata"]["name"],
                                    "uid": owner["metadata"]["uid"], "blockOwnerDeletion": block}]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"k": "v"}}


def test_garbage_collector_deletes_a_child_whose_owner_was_deleted(control_plane: ControlPlane,
                                                                   kube_namespace: str) -> None:
    base = f"/api/v1/namespaces/{kube_namespace}/configmaps"
    status, owner = control_plane.api("POST", base, _configmap("owner"))
    assert status == 201, owner
    status, child = control_plane.api("POST", base, _configmap("child", owner))
    assert status == 201, child
    status, bystander = control_plane.api("POST", base, _configmap("bystander"))
    assert status == 201, bystander

    status, _ = control_plane.api("DELETE", f"{base}/owner")
    assert status == 200
    eventually(lambda: control_plane.api("GET", f"{base}/child")[0] == 404, "the GC to delete the child")
    assert control_plane.api("GET", f"{base}/bystander")[0] == 200


def test_owner_references_permission_enforcement_is_on(control_plane: ControlPlane, kube_namespace: str) -> None:
    """blockOwnerDeletion needs `update` on the owner's finalizers subresource: the issue-11 defect."""
    ns = kube_namespace
    base = f"/api/v1/namespaces/{ns}/configmaps"
    status, owner = control_plane.api("POST", base, _configmap("owner"))
    assert status == 201, owner
    token = service_account_token(control_plane, ns, "creator")
    control_plane.kubectl("create", "role", "cm-writer", "--verb=create,get,list,update,delete",
                          "--resource=configmaps", "-n", ns)
    control_plane.kubectl("create", "rolebinding", "creator", "--role=cm-writer",
                          f"--serviceaccount={ns}:creator", "-n", ns)
    eventually(lambda: control_plane.api("GET", base, token=token)[0] == 200, "the RoleBinding to take effect")

    # Without blockOwnerDeletion the owner reference alone is allowed.
    status, body = control_plane.api("POST", base, _configmap("plain-child", owner), token=token)
    assert status == 201, body
    status, body = control_plane.api("POST", base, _configmap("blocking-child", owner, block=True), token=token)
    assert status == 403, body
    assert "blockOwnerDeletion" in body["message"]

    control_plane.kubectl("create", "role", "cm-finalizers", "--verb=update", "--resource=configmaps/finalizers",
                          "-n", ns)
    control_plane.kubectl("create", "rolebinding", "creator-finalizers", "--role=cm-finalizers",
                          f"--serviceaccount={ns}:creator", "-n", ns)
    eventually(lambda: control_plane.api("POST", base, _configmap("blocking-child", owner, block=True),
                                         token=token)[0] == 201, "the finalizers grant to take effect")


def test_controller_manager_turns_a_deployment_into_a_pod(control_plane: ControlPlane, kube_namespace: str) -> None:
    """Deployment -> ReplicaSet -> Pod through the real controllers, with the ServiceAccount token projected by
    admission. (Whether the pod then runs depends on the node agent, which another fixture may have started.)"""
    ns = kube_namespace
    manifest = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": ns},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "c", "image": "example.invalid/web:1"}]}}},
    }
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(manifest))

    def pods() -> list[dict]:
        out = control_plane.kubectl("get", "pods", "-n", ns, "-l", "app=web", "-o", "json").stdout
        return json.loads(out)["items"]

    eventually(lambda: len(pods()) == 1, "the Deployment's pod")
    pod = pods()[0]
    owner = pod["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "ReplicaSet"
    rs = json.loads(control_plane.kubectl("get", "replicaset", owner["name"], "-n", ns, "-o", "json").stdout)
    assert rs["metadata"]["ownerReferences"][0]["name"] == "web"
    assert pod["spec"]["serviceAccountName"] == "default"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert any("projected" in v for v in volumes.values()), "the ServiceAccount admission plugin projects a token"


def test_every_namespace_gets_the_root_ca_configmap(control_plane: ControlPlane, kube_namespace: str) -> None:
    def has_ca() -> bool:
        proc = control_plane.kubectl("get", "configmap", "kube-root-ca.crt", "-n", kube_namespace, "-o", "json",
                                     check=False)
        return proc.returncode == 0 and "BEGIN CERTIFICATE" in json.loads(proc.stdout)["data"]["ca.crt"]

    eventually(has_ca, "kube-root-ca.crt in the new namespace")
    assert json.loads(control_plane.kubectl("get", "configmap", "kube-root-ca.crt", "-n", kube_namespace,
                                            "-o", "json").stdout)["data"]["ca.crt"].strip() == \
        control_plane.ca_path.read_text().strip()


def test_kubectl_error_is_kept_in_the_exception(control_plane: ControlPlane) -> None:
    with pytest.raises(subprocess.CalledProcessError) as info:
        control_plane.kubectl("get", "configmap", "does-not-exist", "-n", "default")
    assert "not found" in info.value.stderr
