"""A user's cluster for the end-to-end tests: a real control plane, the node agent, and ``helm install``.

Why its own cluster rather than the shared ``control_plane``: these tests install the chart the way a user
does (cluster-wide, CRD included, release ``jest`` in ``jest-system``), so the operator they start watches
every namespace; on the session cluster that other tests drive by hand it would reconcile their jobs too,
and its Helm-owned CRD would clash with the CRD they apply with kubectl. Started once per session, only
when one of these tests asks for it, and stopped by pid (the kernel kills it if pytest dies).
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from hack.devcluster.controlplane import ControlPlane, ControlPlaneError, ensure_binaries, start_control_plane
from tests.conftest import REPO_ROOT, find_free_port
from tests.integration.kube.conftest import wait_for

CHART = REPO_ROOT / "charts" / "jest-operator"
RELEASE = "jest"
OPERATOR_NAMESPACE = "jest-system"
OPERATOR_SERVICE_ACCOUNT = "jest-jest-operator"


def wait_until(predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.5) -> Any:
    """``wait_for`` with this folder's keyword-only timeout and slower default polling."""
    return wait_for(predicate, timeout=timeout, interval=interval, what=what)


@dataclass
class UserCluster:
    """The cluster, the Helm release installed on it and where the node agent keeps its pods' files."""

    cp: ControlPlane
    release: dict[str, Any]
    operator_metrics_port: int

    @property
    def node_dir(self) -> Path:
        """The node agent's workdir (``pods/<ns>_<pod>_<uid8>/`` with logs/ and volumes/ per pod)."""
        return self.cp.workdir / "node"

    def kubectl(self, *args: str, check: bool = True, input_text: str | None = None,
                token: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The real kubectl as admin (or as ``token``); on failure with ``check`` the test fails with its stderr."""
        result = self.cp.kubectl(*args, check=False, input=input_text, token=token, timeout=timeout)
        if check and result.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def get(self, *args: str) -> Any:
        """``kubectl get ... -o json`` decoded, or None when the object does not exist."""
        result = self.kubectl("get", *args, "-o", "json", check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr:
                return None
            pytest.fail(f"kubectl get {' '.join(args)}: {result.stderr}")
        return yaml.safe_load(result.stdout)

    def new_namespace(self, prefix: str) -> str:
        """A fresh namespace whose default ServiceAccount exists (the ServiceAccount admission needs it)."""
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.kubectl("create", "namespace", name)
        wait_until(lambda: self.get("serviceaccount", "default", "-n", name), timeout=30,
                   what=f"the default ServiceAccount of {name}")
        return name

    def pod_dirs(self, namespace: str, name: str) -> list[Path]:
        """The node agent's directories for every pod object of that name (oldest first)."""
        return sorted(self.node_dir.glob(f"pods/{namespace}_{name}_*"), key=lambda path: path.stat().st_mtime)

    def pod_log(self, namespace: str, name: str, container: str) -> str:
        """The newest log of that container (the node agent writes ``logs/<container>.log``)."""
        dirs = self.pod_dirs(namespace, name)
        path = dirs[-1] / "logs" / f"{container}.log" if dirs else None
        return path.read_text(errors="replace") if path is not None and path.exists() else ""

    def operator_pod(self) -> dict[str, Any]:
        """The running operator pod of the release."""
        pods = self.get("pods", "-n", OPERATOR_NAMESPACE, "-l", "app.kubernetes.io/component=operator")
        running = [p for p in (pods or {}).get("items", []) if (p.get("status") or {}).get("phase") == "Running"]
        assert len(running) == 1, f"expected one running operator pod, got {pods}"
        return running[0]

    def operator_log(self) -> str:
        """The operator container's log (all its restarts)."""
        return self.pod_log(OPERATOR_NAMESPACE, self.operator_pod()["metadata"]["name"], "operator")

    def diagnostics(self, namespace: str) -> str:
        """What a failing test prints: objects, events, agent log and the tail of every pod log."""
        parts = [self.kubectl("get", "jtj,pods,svc,cm", "-n", namespace, "-o", "wide", check=False).stdout,
                 self.kubectl("get", "events", "-n", namespace, check=False).stdout,
                 "--- node agent ---\n" + _tail(self.cp.workdir / "logs" / "node-agent.log", 30),
                 "--- operator ---\n" + "\n".join(self.operator_log().splitlines()[-40:])]
        for log in sorted(self.node_dir.glob(f"pods/{namespace}_*/logs/*.log")):
            parts.append(f"--- {log.parent.parent.name}/{log.name} ---\n" + _tail(log, 15))
        return "\n".join(parts)


#: What the API server says when RBAC (or OwnerReferencesPermissionEnforcement, which asks RBAC about the
#: owner's finalizers) refuses the operator; the transient "cannot find RESTMapping" refusal right after a CRD
#: is installed is admission's discovery lag, not a permission problem, and Kopf retries it.
RBAC_DENIAL = re.compile(r'forbidden: User "[^"]+" cannot|cannot set blockOwnerDeletion if an ownerReference refers')


def rbac_denials(log: str) -> list[str]:
    """The operator log lines where the API server refused a call for lack of permission."""
    return [line for line in log.splitlines() if RBAC_DENIAL.search(line)]


def _tail(path: Path, lines: int) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"real control plane unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"real control plane unavailable (run `make controlplane`): {reason}")


def helm_values(metrics_port: int, liveness_port: int) -> dict[str, Any]:
    """The chart's defaults, with free host ports (every pod shares this host) and a 1 s resync for speed."""
    return {"extraArgs": ["--resync-seconds=1"], "metrics": {"port": metrics_port},
            "livenessProbe": {"port": liveness_port, "initialDelaySeconds": 5}}


def owner_references_admit_the_kind(cluster: UserCluster) -> bool:
    """Whether the operator may now create a child that blocks its JESTTrainingJob's deletion.

    The OwnerReferencesPermissionEnforcement admission resolves an owner's kind through a discovery cache
    the API server refreshes on its own schedule, so for a while after ``helm install`` adds the CRD every
    child the operator creates is refused ("cannot find RESTMapping"); the operator retries until then. The
    tests start once the cache knows the kind (a server-side dry run as the operator), so that first
    reconciles' retries do not land in the error rates some of them assert on.
    """
    owned = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "admission-probe", "namespace": "default",
             "ownerReferences": [{"apiVersion": "jest.training/v1alpha1", "kind": "JESTTrainingJob", "name": "probe",
                                  "uid": "00000000-0000-0000-0000-000000000000", "controller": True,
                                  "blockOwnerDeletion": True}]}}
    result = cluster.kubectl("create", "--dry-run=server", "-f", "-", "-o", "name",
                             f"--as=system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}",
                             input_text=yaml.safe_dump(owned), check=False)
    return result.returncode == 0


@pytest.fixture(scope="session")
def user_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserCluster]:
    """Control plane + node agent + ``helm install jest charts/jest-operator -n jest-system --create-namespace``."""
    import helm_python

    try:
        bin_dir = ensure_binaries()
    except ControlPlaneError as error:
        _unavailable(str(error))
    cp = start_control_plane(tmp_path_factory.mktemp("user-cluster"), bin_dir=bin_dir, node_agent=True,
                             die_with_parent=True)
    try:
        metrics_port, liveness_port = find_free_port(), find_free_port()
        config = helm_python.Config(kubeconfig_path=cp.kubeconfig, namespace=OPERATOR_NAMESPACE)
        try:
            release = config.install(str(CHART), RELEASE, helm_values(metrics_port, liveness_port),
                                     namespace=OPERATOR_NAMESPACE, create_namespace=True, wait="watcher",
                                     timeout=180)
        finally:
            config.close()
        cluster = UserCluster(cp, release, metrics_port)
        wait_until(lambda: owner_references_admit_the_kind(cluster), timeout=90, interval=1,
                   what="the API server's admission to know the JESTTrainingJob kind")
        yield cluster
    finally:
        cp.stop()
