"""The chart's admission policy on a real API server: a JESTTrainingJob never gives its author more rights.

Users are impersonated (``kubectl --as``) with only the Roles each test grants them, so RBAC decides exactly
as it would for a person. Every spec refusal's message is compared word for word with what ``jestctl
validate`` (jest_operator.admission) says offline. Policy changes go through ``helm upgrade`` of the
session's release and are undone afterwards.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jest_operator.admission import AdmissionPolicy, refusals
from jest_operator.api import parse_job

from tests.conftest import REPO_ROOT
from tests.e2e.conftest import (
    CHART,
    OPERATOR_NAMESPACE,
    OPERATOR_SERVICE_ACCOUNT,
    RELEASE,
    UserCluster,
    wait_until,
)
from tests.e2e.test_real_cluster import short_quickstart

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

POLICY = f"{RELEASE}-jest-operator-author-rights"
AUTHOR = "alice"  # may create JESTTrainingJobs, nothing else
TRAINER = "bob"  # may create JESTTrainingJobs and pods


def role(name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name}, "rules": rules}


def binding(user: str, role_name: str) -> dict[str, Any]:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": f"{user}-{role_name}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}


JOB_RULES = [{"apiGroups": ["jest.training"], "resources": ["jesttrainingjobs"],
              "verbs": ["create", "get", "list", "watch", "update", "patch", "delete"]}]
POD_RULES = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["create"]}]


@pytest.fixture
def tenant(user_cluster: UserCluster) -> Iterator[str]:
    """A namespace where alice may only write JESTTrainingJobs and bob may also create pods."""
    namespace = user_cluster.new_namespace("tenant")
    documents = [role("jobs", JOB_RULES), role("pods", POD_RULES),
                 binding(AUTHOR, "jobs"), binding(TRAINER, "jobs"), binding(TRAINER, "pods")]
    user_cluster.kubectl("apply", "-n", namespace, "-f", "-", input_text=yaml.safe_dump_all(documents))

    def enforced() -> bool:  # a policy is enforced shortly after it is created, not at once
        result = as_user(user_cluster, AUTHOR, "create", "-n", namespace, "--dry-run=server", "-f", "-",
                         manifest=suspended_job("probe"))
        return f"ValidatingAdmissionPolicy '{POLICY}'" in result.stderr
    wait_until(enforced, timeout=60, interval=1, what="the chart's admission policy to be enforced")
    try:
        yield namespace
    finally:
        user_cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def as_user(cluster: UserCluster, user: str, *args: str, manifest: dict[str, Any] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    """kubectl impersonating ``user`` (the admin kubeconfig may impersonate); never fails the test itself."""
    return cluster.kubectl(f"--as={user}", *args, check=False,
                           input_text=None if manifest is None else yaml.safe_dump(manifest))


def suspended_job(name: str = "held") -> dict[str, Any]:
    """The short quickstart, suspended: admitted jobs of these tests need no pods to run."""
    manifest = short_quickstart()
    manifest["metadata"]["name"] = name
    manifest["spec"]["runPolicy"] = {"suspend": True}
    return manifest


def denial(result: subprocess.CompletedProcess[str]) -> str:
    """The policy's message of a refused kubectl call (the test fails if the call was not refused by it)."""
    assert result.returncode != 0, f"expected a refusal, got: {result.stdout}"
    assert f"ValidatingAdmissionPolicy '{POLICY}'" in result.stderr, result.stderr
    return result.stderr.split("denied request: ", 1)[1].strip()


def pods_message(namespace: str) -> str:
    return (f"user {AUTHOR} may not create pods in namespace {namespace}; a JESTTrainingJob's worker pods are created "
            "with the operator's rights, so creating or changing one needs the right to create those pods yourself "
            "(RBAC: pods, verb create, in this namespace)")


def test_a_user_with_only_job_rights_is_refused_on_create_and_update(user_cluster: UserCluster, tenant: str) -> None:
    cluster = user_cluster
    created = as_user(cluster, AUTHOR, "create", "-n", tenant, "-f", "-", manifest=suspended_job())
    assert denial(created) == pods_message(tenant)
    assert cluster.get("jtj", "held", "-n", tenant) is None

    # an admin's job: alice may still read and label it (the spec is unchanged), but not change what it runs
    cluster.kubectl("create", "-n", tenant, "-f", "-", input_text=yaml.safe_dump(suspended_job()))
    labelled = as_user(cluster, AUTHOR, "label", "jtj", "held", "-n", tenant, "team=vision")
    assert labelled.returncode == 0, labelled.stderr
    changed = as_user(cluster, AUTHOR, "patch", "jtj", "held", "-n", tenant, "--type=merge",
                      "-p", '{"spec": {"runPolicy": {"suspend": false}}}')
    assert denial(changed) == pods_message(tenant)
    assert cluster.get("jtj", "held", "-n", tenant)["spec"]["runPolicy"]["suspend"] is True


def test_a_user_who_may_create_pods_is_accepted_and_the_operator_reconciles(
    user_cluster: UserCluster, tenant: str
) -> None:
    """bob's job trains to Succeeded: the operator's status, finalizer and child writes all pass the policy."""
    cluster = user_cluster
    manifest = short_quickstart()
    created = as_user(cluster, TRAINER, "create", "-n", tenant, "-f", "-", manifest=manifest)
    assert created.returncode == 0, created.stderr
    name = manifest["metadata"]["name"]
    phase = wait_until(lambda: (cluster.get("jtj", name, "-n", tenant) or {}).get("status", {}).get("phase")
                       in ("Succeeded", "Failed") and cluster.get("jtj", name, "-n", tenant)["status"]["phase"],
                       timeout=420, interval=2, what="bob's job to finish")
    assert phase == "Succeeded", cluster.diagnostics(tenant)
    status = cluster.get("jtj", name, "-n", tenant)["status"]
    assert status["progress"]["step"] == 30, status
    pods = cluster.get("pods", "-n", tenant, "-l", f"jest.training/job-name={name}")["items"]
    assert pods, "the job's pods are kept after success"
    for pod in pods:  # no API credentials for a worker that did not ask for a ServiceAccount
        assert pod["spec"]["automountServiceAccountToken"] is False
        assert not any("serviceAccountToken" in str(volume) for volume in pod["spec"].get("volumes", []))


def test_a_job_that_asks_for_a_service_account_gets_its_token(user_cluster: UserCluster, tenant: str) -> None:
    cluster = user_cluster
    cluster.kubectl("create", "serviceaccount", "trainer", "-n", tenant)
    manifest = short_quickstart()
    manifest["metadata"]["name"] = "with-identity"
    manifest["spec"]["podTemplate"] = {"serviceAccountName": "trainer"}
    created = as_user(cluster, TRAINER, "create", "-n", tenant, "-f", "-", manifest=manifest)
    assert created.returncode == 0, created.stderr
    pod = wait_until(lambda: cluster.get("pod", "with-identity-node-0", "-n", tenant), timeout=60,
                     what="the first worker pod")
    assert pod["spec"]["serviceAccountName"] == "trainer"
    assert "automountServiceAccountToken" not in pod["spec"]
    cluster.kubectl("delete", "jtj", "with-identity", "-n", tenant, "--wait=false")


def with_volume(name: str, volume: dict[str, Any]) -> dict[str, Any]:
    manifest = suspended_job(name)
    manifest["spec"]["podTemplate"] = {"volumes": [{"name": "extra", **volume}],
                                       "volumeMounts": [{"name": "extra", "mountPath": "/extra"}]}
    return manifest


def with_secret_env(name: str) -> dict[str, Any]:
    manifest = suspended_job(name)
    manifest["spec"]["podTemplate"] = {"env": [
        {"name": "PLAIN", "value": "x"},
        {"name": "S3_KEY", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
        {"name": "S3_SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "secret"}}},
    ]}
    return manifest


def with_service_account(name: str) -> dict[str, Any]:
    manifest = suspended_job(name)
    manifest["spec"]["podTemplate"] = {"serviceAccountName": "default"}
    return manifest


SECRET_VOLUME = with_volume("secret-volume", {"secret": {"secretName": "creds"}})
PROJECTED_TOKEN = with_volume("projected-token", {"projected": {"sources": [
    {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}}]}})
SECRET_ENV = with_secret_env("secret-env")
SERVICE_ACCOUNT = with_service_account("own-identity")
ALLOWED = [with_volume("pvc", {"persistentVolumeClaim": {"claimName": "data"}}),
           with_volume("csi", {"csi": {"driver": "gcsfuse.csi.storage.gke.io",
                                       "volumeAttributes": {"bucketName": "b"}}}),
           with_volume("config", {"configMap": {"name": "vocab"}})]


def jestctl_validate(manifest: dict[str, Any], values: dict[str, Any] | None, tmp_path: Any) -> str:
    """What ``jestctl validate`` prints to stderr for ``manifest`` under the chart values ``values``."""
    path = tmp_path / f"{manifest['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    args = [str(Path(sys.executable).parent / "jestctl"), "validate", str(path)]
    if values is not None:
        (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
        args += ["--admission-values", str(tmp_path / "values.yaml")]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT)
    return result.stderr


def assert_refused_as_offline(cluster: UserCluster, namespace: str, manifest: dict[str, Any],
                              values: dict[str, Any] | None, tmp_path: Any) -> str:
    """The server refuses ``manifest`` (as bob, who may create pods) with exactly jestctl's message."""
    message = denial(as_user(cluster, TRAINER, "create", "-n", namespace, "-f", "-", manifest=manifest))
    offline = refusals(parse_job(copy.deepcopy(manifest)), AdmissionPolicy.from_values(values or {}))
    assert offline and message == offline[0], (message, offline)
    assert message in jestctl_validate(manifest, values, tmp_path)
    return message


def test_the_default_policy_refuses_secrets_and_tokens_with_jestctls_messages(
    user_cluster: UserCluster, tenant: str, tmp_path: Any
) -> None:
    cluster = user_cluster
    for manifest in (SECRET_VOLUME, PROJECTED_TOKEN, SECRET_ENV):
        assert_refused_as_offline(cluster, tenant, manifest, None, tmp_path)
        assert cluster.get("jtj", manifest["metadata"]["name"], "-n", tenant) is None
    for manifest in (*ALLOWED, SERVICE_ACCOUNT):
        created = as_user(cluster, TRAINER, "create", "-n", tenant, "-f", "-", manifest=manifest)
        assert created.returncode == 0, created.stderr
        assert refusals(parse_job(copy.deepcopy(manifest)), AdmissionPolicy()) == []


def upgrade(cluster: UserCluster, policy: dict[str, Any]) -> None:
    """``helm upgrade`` of the session's release with ``admissionPolicy`` replaced (other values kept)."""
    import helm_python

    config = helm_python.Config(kubeconfig_path=cluster.cp.kubeconfig, namespace=OPERATOR_NAMESPACE)
    try:
        config.upgrade(str(CHART), RELEASE, {"admissionPolicy": policy}, namespace=OPERATOR_NAMESPACE,
                       reuse_values=True, wait="watcher", timeout=180)
    finally:
        config.close()


@pytest.fixture
def restore_policy(user_cluster: UserCluster) -> Iterator[None]:
    yield
    upgrade(user_cluster, {"enabled": True, "allowedVolumeTypes": ["persistentVolumeClaim", "configMap", "emptyDir",
                                                                   "csi"],
                           "allowServiceAccountName": True, "allowSecretEnv": False})


def refused_until_enforced(cluster: UserCluster, namespace: str, manifest: dict[str, Any], check: str) -> None:
    """Wait for the API server to enforce the upgraded policy (it picks policy changes up asynchronously):
    until a server-side dry run of ``manifest`` (under a fresh name) by bob is refused with ``check``."""
    probe = copy.deepcopy(manifest)
    probe["metadata"]["name"] = f"{manifest['metadata']['name']}-probe"

    def refused() -> bool:
        result = as_user(cluster, TRAINER, "create", "-n", namespace, "--dry-run=server", "-f", "-", manifest=probe)
        return result.returncode != 0 and "denied request: " in result.stderr and check in result.stderr
    wait_until(refused, timeout=60, interval=1, what=f"the upgraded policy to refuse {check}")


def test_an_admin_tightens_or_loosens_the_policy_and_disabling_it_leaves_none_behind(
    user_cluster: UserCluster, tenant: str, tmp_path: Any, restore_policy: None
) -> None:
    cluster = user_cluster
    tight = {"enabled": True, "allowedVolumeTypes": ["persistentVolumeClaim", "secret"],
             "allowServiceAccountName": False, "allowSecretEnv": True}
    upgrade(cluster, tight)
    refused_until_enforced(cluster, tenant, SERVICE_ACCOUNT, "spec.podTemplate.serviceAccountName")
    values = {"admissionPolicy": tight}
    assert_refused_as_offline(cluster, tenant, SERVICE_ACCOUNT, values, tmp_path)
    assert_refused_as_offline(cluster, tenant, with_volume("empty", {"emptyDir": {}}), values, tmp_path)
    for manifest in (SECRET_VOLUME, SECRET_ENV):  # what this admin allows
        created = as_user(cluster, TRAINER, "create", "-n", tenant, "-f", "-", manifest=manifest)
        assert created.returncode == 0, created.stderr

    upgrade(cluster, {**tight, "enabled": False})
    for kind in ("validatingadmissionpolicy", "validatingadmissionpolicybinding"):
        assert cluster.get(kind, POLICY) is None, f"{kind} {POLICY} left behind"
    # without the policy the operator is a confused deputy again: alice's job is admitted
    created = wait_until(lambda: as_user(cluster, AUTHOR, "create", "-n", tenant, "-f", "-",
                                         manifest=suspended_job("unchecked")).returncode == 0,
                         timeout=60, interval=1, what="the API server to drop the removed policy")
    assert created

    # a job admitted while the policy was off keeps running; once it is back, nobody may change that job's spec
    # except the operator (here its budget-style suspend patch), and metadata-only writes still pass
    legacy = copy.deepcopy(SECRET_VOLUME)
    legacy["metadata"]["name"] = "legacy"
    legacy["spec"]["runPolicy"] = {"suspend": False}
    cluster.kubectl("create", "-n", tenant, "-f", "-", input_text=yaml.safe_dump(legacy))
    upgrade(cluster, {**tight, "enabled": True, "allowedVolumeTypes": ["persistentVolumeClaim"]})
    refused_until_enforced(cluster, tenant, SECRET_VOLUME, "spec.podTemplate.volumes")
    suspend = ["patch", "jtj", "legacy", "-n", tenant, "--type=merge",
               "-p", '{"spec": {"runPolicy": {"suspend": true}}}']
    assert denial(as_user(cluster, AUTHOR, *suspend)) == pods_message(tenant)
    as_admin = cluster.kubectl(*suspend, check=False)
    assert "spec.podTemplate.volumes: extra (secret)" in denial(as_admin)  # even cluster-admin meets the spec checks
    labelled = cluster.kubectl("label", "jtj", "legacy", "-n", tenant, "reviewed=yes", check=False)
    assert labelled.returncode == 0, labelled.stderr
    operator = as_user(cluster, f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}", *suspend)
    assert operator.returncode == 0, operator.stderr
    assert cluster.get("jtj", "legacy", "-n", tenant)["spec"]["runPolicy"]["suspend"] is True


def test_a_fresh_install_with_the_policy_off_creates_no_policy(user_cluster: UserCluster) -> None:
    """``helm install`` with ``admissionPolicy.enabled=false`` (a second release, serving only its own namespace,
    the CRD left to the first) installs no policy or binding, and leaves the first release's policy alone."""
    import helm_python

    from tests.conftest import find_free_port
    from tests.e2e.conftest import helm_values

    cluster = user_cluster
    release, namespace = "nopolicy", cluster.new_namespace("nopolicy")
    values = {**helm_values(find_free_port(), find_free_port()), "crds": {"install": False},
              "watchNamespaces": [namespace], "admissionPolicy": {"enabled": False}}
    config = helm_python.Config(kubeconfig_path=cluster.cp.kubeconfig, namespace=namespace)
    try:
        installed = config.install(str(CHART), release, values, namespace=namespace, wait="watcher", timeout=180)
        kinds = {document["kind"] for document in yaml.safe_load_all(installed["manifest"]) if document}
        assert "Deployment" in kinds and not kinds & {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
        for kind in ("validatingadmissionpolicy", "validatingadmissionpolicybinding"):
            names = [item["metadata"]["name"] for item in cluster.get(kind)["items"]]
            assert names == [POLICY], f"{kind}: {names}"  # only the session release's, which stays
    finally:
        try:
            config.uninstall(release, wait="watcher", timeout=120, ignore_not_found=True)
        finally:
            config.close()
