"""A node agent for the dev control plane: one Node whose pods run as local processes.

Why: the dev cluster (``hack/devcluster``) is a real kube-apiserver + etcd + kube-controller-manager with
neither kube-scheduler nor kubelet, and no container runtime exists here. This agent plays both parts for
one Node, so a Deployment's pod (the operator, installed by ``helm install``) and the operator's worker pods
(the trainers) really run, and every object the API server holds about them is what a kubelet would write.

What it does, in kubelet terms:

- **registers** a Node (Ready, capacity/allocatable from this machine) and renews its Lease in
  ``kube-node-lease``;
- **schedules**: binds unscheduled pods to itself through ``pods/binding`` when their nodeSelector, required
  node affinity, tolerations and extended-resource requests fit this node; others stay Pending with
  ``PodScheduled=False, reason=Unschedulable`` and a scheduler-style message. Pods with scheduling gates or
  another ``schedulerName`` are left alone (another scheduler owns them);
- **runs** each container's ``command``/``args`` as a local process group through ``jest_operator.local``
  (the same process supervision ``jestctl run`` uses): the pod's ``env`` (``valueFrom`` field, ConfigMap,
  Secret and resource references, ``$(VAR)`` expansion), volumes materialised under a per-pod directory
  (configMap, secret, downwardAPI, projected, emptyDir, persistentVolumeClaim) with every ``mountPath`` in
  env values, args, ``workingDir`` and JSON config files rewritten to that directory; init containers run
  first, in order; ``restartPolicy`` Always/OnFailure restart containers with a capped back-off;
- **service accounts**: when the pod mounts a projected ``serviceAccountToken`` (the ServiceAccount admission
  plugin adds it unless ``automountServiceAccountToken: false``) the token comes from the TokenRequest API,
  bound to the pod, and is written with ``ca.crt`` to the pod's directory; the process gets ``KUBECONFIG``
  naming a kubeconfig whose user is that token, plus ``KUBERNETES_SERVICE_HOST``/``PORT``, so in-cluster
  clients authenticate as the pod's ServiceAccount and every call is checked by RBAC (never as the agent);
- **networking on one host**: each pod gets its own loopback address (127.N.0.10, .11, ... all of 127/8 routes to
  ``lo`` on Linux; the second octet follows the API server's port so two dev clusters never share
  one), reported as ``status.podIP``; pod DNS names ``<hostname>.<subdomain>.<ns>.svc`` in env
  values and args become that pod's IP (a headless Service's records, as cluster DNS would serve them);
  ``JEST_METRICS_HOST`` is the pod IP so trainers serve ``:9090`` side by side; ``GLOO_SOCKET_IFNAME=lo``;
  because torch's TCPStore listens on every interface, the rendezvous port (``MASTER_PORT`` beside a
  ``MASTER_ADDR`` that names a pod) is remapped to a free host port per target pod;
- **status** through ``pods/status`` (strategic merge, so conditions others own, such as DisruptionTarget,
  survive): phase, PodScheduled/PodReadyToStartContainers/Initialized/ContainersReady/Ready, container
  states with exit codes (and the termination message: the per-container file that stands for
  ``terminationMessagePath``, default ``/dev/termination-log``, or, with ``FallbackToLogsOnError``, the log
  tail), readiness from httpGet/tcpSocket probes, liveness restarts;
- **deletion**: on ``deletionTimestamp`` every container gets SIGTERM, SIGKILL after the pod's
  ``deletionGracePeriodSeconds``, the final status is written, and the pod is deleted with grace 0 (as the
  kubelet does) so the object goes away;
- **shutdown** (SIGTERM to the agent, or :meth:`NodeAgent.stop`) kills every process group it started;
- namespaces labelled ``jest.training/node-agent=off`` are left alone (tests that play the kubelet there).

- **``kubectl logs``**: the kubelet endpoint (HTTPS on 127.0.0.1, a self-signed serving certificate, client
  certificates checked against the cluster CA, port in ``status.daemonEndpoints``) serves
  ``/containerLogs/<ns>/<pod>/<container>`` with ``tailLines``, ``limitBytes`` and ``follow``; the API server
  proxies ``kubectl logs [-f]`` there. Logs are also plain files under ``<workdir>/pods/<ns>_<pod>_<uid8>/logs/``.

Not a kubelet: no cgroups or resource enforcement (requests are only used for the fit check of extended
resources and ``OMP_NUM_THREADS``), no images (``command`` is required; executables resolve from this
interpreter's environment first), no exec probes, no ``kubectl exec``/``port-forward``. Per-pod directories
are kept after deletion for inspection.

The pure parts (fit, env, volumes, the local command, status derivation) take plain dicts and are
unit-tested in ``tests/unit/hack/``; :class:`NodeAgent` is the thin I/O shell around them.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import datetime as dt
import ipaddress
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from jest_operator.local import LocalCommand, LocalPodProcess, expand_references, resolve_executable

LOG = logging.getLogger("jest.node-agent")

DEFAULT_NODE_NAME = "jest-node-0"
DEFAULT_POD_IP_BASE = "127.0.0.10"
HOST_IP = "127.0.0.1"
DEFAULT_SCHEDULER = "default-scheduler"
FIELD_MANAGER = "jest-node-agent"
KUBELET_VERSION = "v0.0.0-jest-node-agent"
NODE_LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_SECONDS = 40
SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_TOKEN_EXPIRATION_SECONDS = 3607
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
MAX_TERMINATION_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES = 80
RESTART_BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 10.0)
#: A namespace labelled ``jest.training/node-agent: "off"`` is left alone: its pods are neither bound nor run
#: (tests that play the kubelet themselves share the session's cluster with the agent).
NAMESPACE_OPT_OUT_LABEL = "jest.training/node-agent"
NAMESPACE_OPT_OUT_VALUE = "off"
NAMESPACE_CACHE_SECONDS = 10.0
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
MERGE_PATCH = "application/merge-patch+json"
#: ``<ADDR variable>: <PORT variable>`` pairs whose port is a rendezvous served by the pod the address names.
RENDEZVOUS_PAIRS: dict[str, str] = {"MASTER_ADDR": "MASTER_PORT", "PET_MASTER_ADDR": "PET_MASTER_PORT"}
#: Variables of the agent's own environment that pods inherit (a container runtime's image environment).
PASS_THROUGH_ENV = re.compile(r"^(PATH|LANG|LC_[A-Z]+|TZ|TERM|OMP_NUM_THREADS|MKL_NUM_THREADS|OPENBLAS_NUM_THREADS"
                              r"|SSL_CERT_FILE|SSL_CERT_DIR|REQUESTS_CA_BUNDLE)$")
#: Resources the fit check leaves to the (absent) cgroups: every pod shares this host's CPU and memory.
SHARED_RESOURCES = re.compile(r"^(cpu|memory|ephemeral-storage|hugepages-.*)$")
_POD_DNS_NAME = re.compile(
    r"(?<![A-Za-z0-9.-])([a-z0-9](?:[-a-z0-9]*[a-z0-9])?)\.([a-z0-9](?:[-a-z0-9]*[a-z0-9])?)"
    r"\.([a-z0-9](?:[-a-z0-9]*[a-z0-9])?)\.svc(?:\.cluster\.local)?(?![A-Za-z0-9.-])"
)


class PlanError(ValueError):
    """A pod cannot run on this node as written; ``field`` is the pod path at fault, ``reason`` the kubelet reason.

    ``retry`` marks a wait for something that may appear (a ConfigMap not yet created, a peer pod not yet
    known): the agent keeps the container waiting and tries again, as the kubelet does.
    """

    def __init__(self, field: str, message: str, *, reason: str = "CreateContainerConfigError",
                 retry: bool = True) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.reason = reason
        self.retry = retry


# ------------------------------------------------------------------------------------------ time, quantities
def now_utc() -> dt.datetime:
    """The current time in UTC (second precision is what pod timestamps carry)."""
    return dt.datetime.now(dt.UTC)


def rfc3339(moment: dt.datetime) -> str:
    """``2026-12-02T17:30:00Z``: the wire form of metav1.Time."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time(moment: dt.datetime) -> str:
    """``2026-12-02T17:30:00.123456Z``: the wire form of metav1.MicroTime (Lease renewTime)."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")
_SUFFIXES = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def parse_quantity(value: str | int | float, where: str = "quantity") -> float:
    """A Kubernetes resource quantity (``500m``, ``2Gi``, ``1e3``) as a float of base units."""
    match = _QUANTITY.match(str(value).strip())
    if not match or match.group(2) not in _SUFFIXES:
        raise PlanError(where, f"{value!r} is not a resource quantity", retry=False)
    return float(match.group(1)) * _SUFFIXES[match.group(2)]


# ------------------------------------------------------------------------------------------------ the node
@dataclass(frozen=True)
class NodeSpec:
    """What this node is: name, labels, taints and resources (capacity == allocatable, nothing reserved)."""

    name: str = DEFAULT_NODE_NAME
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Mapping[str, Any], ...] = ()
    capacity: Mapping[str, str] = field(default_factory=dict)
    host_ip: str = HOST_IP

    def all_labels(self) -> dict[str, str]:
        """The well-known labels a kubelet sets, then the configured ones."""
        arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), platform.machine())
        return {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": arch,
                "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": arch, **self.labels}


def machine_capacity() -> dict[str, str]:
    """This machine's CPUs and memory, and the kubelet's default pod limit."""
    memory_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    return {"cpu": str(os.cpu_count() or 1), "memory": f"{memory_kib or 4 * 2**20}Ki", "pods": "110",
            "ephemeral-storage": "64Gi"}


def node_manifest(spec: NodeSpec) -> dict[str, Any]:
    """The Node object the agent registers (status is written separately through nodes/status)."""
    node: dict[str, Any] = {"apiVersion": "v1", "kind": "Node",
                            "metadata": {"name": spec.name, "labels": spec.all_labels(),
                                         "annotations": {"node.alpha.kubernetes.io/ttl": "0"}},
                            "spec": {}}
    if spec.taints:
        node["spec"]["taints"] = [dict(taint) for taint in spec.taints]
    return node


def node_status(spec: NodeSpec, now: dt.datetime, ready_since: dt.datetime, kubelet_port: int = 0) -> dict[str, Any]:
    """A healthy node's status: Ready since ``ready_since``, heartbeat ``now``, kubectl logs on ``kubelet_port``."""
    beat, since = rfc3339(now), rfc3339(ready_since)

    def condition(type_: str, status: str, reason: str, message: str) -> dict[str, str]:
        return {"type": type_, "status": status, "reason": reason, "message": message,
                "lastHeartbeatTime": beat, "lastTransitionTime": since}

    return {
        "capacity": dict(spec.capacity),
        "allocatable": dict(spec.capacity),
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory",
                      "kubelet has sufficient memory available"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            condition("Ready", "True", "KubeletReady", "jest node agent is posting ready status"),
        ],
        "addresses": [{"type": "InternalIP", "address": spec.host_ip}, {"type": "Hostname", "address": spec.name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
        "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": platform.release(),
                     "osImage": "jest node agent (local processes)", "containerRuntimeVersion": "local://0",
                     "kubeletVersion": KUBELET_VERSION, "kubeProxyVersion": "", "operatingSystem": "linux",
                     "architecture": spec.all_labels()["kubernetes.io/arch"]},
    }


def lease_manifest(node_name: str, now: dt.datetime) -> dict[str, Any]:
    """The node's heartbeat Lease in kube-node-lease (what node lifecycle controllers read)."""
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": node_name, "namespace": NODE_LEASE_NAMESPACE},
            "spec": {"holderIdentity": node_name, "leaseDurationSeconds": LEASE_DURATION_SECONDS,
                     "renewTime": micro_time(now)}}


# ---------------------------------------------------------------------------------------------- scheduling
@dataclass(frozen=True)
class Fit:
    """Whether a pod fits this node; ``message`` is phrased like kube-scheduler's for the PodScheduled condition."""

    ok: bool
    message: str = ""


def wants_binding(pod: Mapping[str, Any]) -> bool:
    """An unscheduled, live pod that the default scheduler (which this agent stands in for) owns."""
    spec, metadata = pod.get("spec") or {}, pod.get("metadata") or {}
    return (not spec.get("nodeName") and not metadata.get("deletionTimestamp")
            and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
            and (spec.get("schedulerName") or DEFAULT_SCHEDULER) == DEFAULT_SCHEDULER
            and not spec.get("schedulingGates"))


def _expression_matches(expression: Mapping[str, Any], values: Mapping[str, str]) -> bool:
    key, operator = expression.get("key", ""), expression.get("operator", "")
    wanted = [str(value) for value in expression.get("values") or []]
    present = key in values
    if operator == "In":
        return present and values[key] in wanted
    if operator == "NotIn":
        return not present or values[key] not in wanted
    if operator == "Exists":
        return present
    if operator == "DoesNotExist":
        return not present
    if operator in ("Gt", "Lt") and present and wanted:
        with contextlib.suppress(ValueError):
            have, limit = int(values[key]), int(wanted[0])
            return have > limit if operator == "Gt" else have < limit
    return False


def _term_matches(term: Mapping[str, Any], labels: Mapping[str, str], node_name: str) -> bool:
    expressions = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not expressions and not fields:
        return False  # an empty term matches nothing (scheduler semantics)
    return (all(_expression_matches(e, labels) for e in expressions)
            and all(_expression_matches(f, {"metadata.name": node_name}) for f in fields))


def _tolerates(tolerations: Iterable[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    for toleration in tolerations:
        effect = toleration.get("effect")
        if effect and effect != taint.get("effect"):
            continue
        operator = toleration.get("operator") or "Equal"
        key = toleration.get("key")
        if not key and operator == "Exists":
            return True
        if key != taint.get("key"):
            continue
        if operator == "Exists" or str(toleration.get("value") or "") == str(taint.get("value") or ""):
            return True
    return False


def pod_requests(pod: Mapping[str, Any]) -> dict[str, float]:
    """Effective requests (max of the init containers', sum of the containers'); limits imply requests."""
    def of(container: Mapping[str, Any]) -> dict[str, float]:
        resources = container.get("resources") or {}
        merged = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
        return {name: parse_quantity(value, f"resources.{name}") for name, value in merged.items()}

    spec = pod.get("spec") or {}
    total: dict[str, float] = {}
    for container in spec.get("containers") or []:
        for name, amount in of(container).items():
            total[name] = total.get(name, 0.0) + amount
    for container in spec.get("initContainers") or []:
        for name, amount in of(container).items():
            total[name] = max(total.get(name, 0.0), amount)
    return total


def fit(pod: Mapping[str, Any], node: NodeSpec) -> Fit:
    """nodeSelector, required node affinity, NoSchedule/NoExecute taints and extended resources, in that order."""
    spec = pod.get("spec") or {}
    labels = node.all_labels()
    unavailable = "0/1 nodes are available: 1 "
    selector = spec.get("nodeSelector") or {}
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = required.get("nodeSelectorTerms") or []
    if any(labels.get(key) != str(value) for key, value in selector.items()) or (
            terms and not any(_term_matches(term, labels, node.name) for term in terms)):
        return Fit(False, unavailable + "node(s) didn't match Pod's node affinity/selector.")
    for taint in node.taints:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(spec.get("tolerations") or [], taint):
            shown = f"{taint.get('key')}: {taint.get('value')}" if taint.get("value") else str(taint.get("key"))
            return Fit(False, unavailable + f"node(s) had untolerated taint {{{shown}}}.")
    allocatable = {name: parse_quantity(value, f"node.capacity.{name}") for name, value in node.capacity.items()}
    for name, amount in sorted(pod_requests(pod).items()):
        if amount > 0 and not SHARED_RESOURCES.match(name) and amount > allocatable.get(name, 0.0):
            return Fit(False, unavailable + f"Insufficient {name}.")
    return Fit(True)


# ----------------------------------------------------------------------------------------------- addresses
@dataclass(frozen=True)
class PodAddress:
    """A pod this node runs, as cluster DNS would know it: ``<hostname>.<subdomain>.<namespace>.svc``."""

    namespace: str
    hostname: str
    subdomain: str
    ip: str
    uid: str


#: Answers a pod DNS name's parts with the pod (or None while no such pod runs here).
Resolver = Callable[[str, str, str], PodAddress | None]
#: Maps (target pod, its container port) to the host port that stands for it.
PortMapper = Callable[[PodAddress, int], int]


def pod_dns_names(value: str) -> list[tuple[str, str, str]]:
    """(hostname, subdomain, namespace) of every pod DNS name in ``value``."""
    return [(m.group(1), m.group(2), m.group(3)) for m in _POD_DNS_NAME.finditer(value)]


def localize_value(value: str, resolve: Resolver, where: str) -> tuple[str, PodAddress | None]:
    """``value`` with every pod DNS name replaced by that pod's IP, and the first pod named (if any).

    Raises a retryable PlanError naming ``where`` when a name points at no known pod yet (the pod waits,
    as a process would wait for DNS).
    """
    first: list[PodAddress] = []

    def substitute(match: re.Match[str]) -> str:
        address = resolve(match.group(3), match.group(1), match.group(2))
        if address is None:
            raise PlanError(where, f"{match.group(0)} does not resolve to a pod on this node yet",
                            reason="ContainerCreating")
        first.append(address)
        return address.ip

    return _POD_DNS_NAME.sub(substitute, value), (first[0] if first else None)


def localize_addresses(env: Mapping[str, str], resolve: Resolver, map_port: PortMapper) -> dict[str, str]:
    """Pod DNS names -> pod IPs in every value; a rendezvous port beside such an address -> its host port."""
    result = dict(env)
    targets: dict[str, PodAddress] = {}
    for name, value in env.items():
        result[name], target = localize_value(value, resolve, f"env {name}")
        if target is not None:
            targets[name] = target
    for address_variable, port_variable in RENDEZVOUS_PAIRS.items():
        target = targets.get(address_variable)
        port = result.get(port_variable, "")
        if target is not None and port.isdigit():
            result[port_variable] = str(map_port(target, int(port)))
    return result


# ---------------------------------------------------------------------------------------------------- mounts
@dataclass(frozen=True)
class Mount:
    """A container path and the host directory (or file, with subPath) that stands for it."""

    container_path: str
    host_path: Path


@dataclass(frozen=True)
class MountTable:
    """Rewrites container paths to host paths, longest mountPath first."""

    mounts: tuple[Mount, ...]

    @classmethod
    def of(cls, mounts: Iterable[Mount]) -> MountTable:
        """Deduplicated by container path (first wins), longest first."""
        seen: dict[str, Mount] = {}
        for mount in mounts:
            seen.setdefault(mount.container_path.rstrip("/") or "/", mount)
        return cls(tuple(sorted(seen.values(), key=lambda m: len(m.container_path.rstrip("/")), reverse=True)))

    def rewrite_path(self, path: str) -> str | None:
        """The host path for an absolute container path under a mount, else None."""
        for mount in self.mounts:
            root = mount.container_path.rstrip("/") or "/"
            if path == root:
                return str(mount.host_path)
            if path.startswith(root.rstrip("/") + "/"):
                return str(mount.host_path / path[len(root.rstrip("/")) + 1:])
        return None

    def rewrite(self, value: str) -> str:
        """Every absolute path under a mount inside ``value`` (alone, after ``=``/``:``/``,``/space) rewritten."""
        if not self.mounts:
            return value

        def substitute(match: re.Match[str]) -> str:
            rewritten = self.rewrite_path(match.group(0))
            return match.group(0) if rewritten is None else rewritten

        return re.sub(r"(?:^|(?<=[=:, ]))/[^:, =]*", substitute, value)

    def rewrite_json(self, document: Any) -> Any:
        """Every string of a JSON document that is an absolute path under a mount, rewritten (keys untouched)."""
        if isinstance(document, dict):
            return {key: self.rewrite_json(value) for key, value in document.items()}
        if isinstance(document, list):
            return [self.rewrite_json(value) for value in document]
        if isinstance(document, str) and document.startswith("/"):
            return self.rewrite_path(document) or document
        return document


# ------------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class PodInputs:
    """Everything the planner reads besides the pod: what the agent fetched and decided for it.

    ``config_maps``/``secrets`` map names in the pod's namespace to objects (a missing name means the
    object does not exist); ``tokens`` maps ``(volume, path)`` of each projected serviceAccountToken source
    to the token the TokenRequest API issued; ``ca_pem`` is the cluster CA (also in kube-root-ca.crt).
    """

    pod_ip: str
    pod_dir: Path
    pvc_root: Path
    api_server: str
    ca_pem: str
    node: NodeSpec = field(default_factory=NodeSpec)
    config_maps: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    secrets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    tokens: Mapping[tuple[str, str], str] = field(default_factory=dict)
    resolve: Resolver = field(default=lambda namespace, hostname, subdomain: None)
    map_port: PortMapper = field(default=lambda address, port: port)
    base_env: Mapping[str, str] = field(default_factory=dict)


@dataclass
class ContainerPlan:
    """One container as a local command, plus what the status and probes need to know about it."""

    name: str
    init: bool
    command: LocalCommand
    spec: Mapping[str, Any]
    termination_message_file: Path | None
    log_path: Path


@dataclass
class PodPlan:
    """Files and directories to create, then containers to run (init containers first, in order)."""

    directories: list[Path]
    files: dict[Path, bytes]
    init_containers: list[ContainerPlan]
    containers: list[ContainerPlan]
    kubeconfig: Path | None


def pod_directory(workdir: Path, pod: Mapping[str, Any]) -> Path:
    """``<workdir>/pods/<namespace>_<name>_<uid[:8]>``: one directory per pod object."""
    metadata = pod.get("metadata") or {}
    uid = str(metadata.get("uid", ""))[:8]
    return workdir / "pods" / f"{metadata.get('namespace', 'default')}_{metadata.get('name')}_{uid}"


def _field_ref(pod: Mapping[str, Any], path: str, inputs: PodInputs, where: str) -> str:
    metadata, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    simple = {
        "metadata.name": metadata.get("name", ""),
        "metadata.namespace": metadata.get("namespace", "default"),
        "metadata.uid": metadata.get("uid", ""),
        "spec.nodeName": spec.get("nodeName") or inputs.node.name,
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.podIP": inputs.pod_ip,
        "status.podIPs": inputs.pod_ip,
        "status.hostIP": inputs.node.host_ip,
        "status.hostIPs": inputs.node.host_ip,
    }
    if path in simple:
        return str(simple[path])
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return str((metadata.get(match.group(1)) or {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = metadata.get(path.split(".")[1]) or {}
        return "\n".join(f'{key}="{value}"' for key, value in sorted(items.items()))
    raise PlanError(where, f"fieldRef {path!r} is not supported", retry=False)


def _resource_ref(pod: Mapping[str, Any], container: Mapping[str, Any], ref: Mapping[str, Any],
                  inputs: PodInputs, where: str) -> str:
    resource = str(ref.get("resource", ""))
    kind, _, name = resource.partition(".")
    resources = container.get("resources") or {}
    value = (resources.get(kind) or {}).get(name)
    if value is None and kind == "requests":
        value = (resources.get("limits") or {}).get(name)
    if value is None:
        value = inputs.node.capacity.get(name)  # an unset limit reads as the node's allocatable
    if value is None:
        raise PlanError(where, f"resource {resource!r} is not set and the node has no {name!r}", retry=False)
    divisor = parse_quantity(ref.get("divisor") or "1", f"{where}.divisor")
    return str(max(1, math.ceil(parse_quantity(value, where) / divisor)))


def _key_ref(kind: str, source: Mapping[str, Any], objects: Mapping[str, Mapping[str, Any]], where: str) -> str | None:
    name, key = str(source.get("name", "")), str(source.get("key", ""))
    obj = objects.get(name)
    if obj is None:
        if source.get("optional"):
            return None
        raise PlanError(where, f'{kind} "{name}" not found')
    data = _object_data(kind, obj)
    if key not in data:
        if source.get("optional"):
            return None
        namespace = (obj.get("metadata") or {}).get("namespace", "")
        raise PlanError(where, f"couldn't find key {key} in {kind} {namespace}/{name}")
    return data[key].decode("utf-8", errors="replace")


def _object_data(kind: str, obj: Mapping[str, Any]) -> dict[str, bytes]:
    """A ConfigMap's data + binaryData or a Secret's (base64) data + stringData, as bytes by key."""
    if kind == "secret":
        out = {key: base64.b64decode(value) for key, value in (obj.get("data") or {}).items()}
        out.update({key: str(value).encode() for key, value in (obj.get("stringData") or {}).items()})
        return out
    out = {key: str(value).encode() for key, value in (obj.get("data") or {}).items()}
    out.update({key: base64.b64decode(value) for key, value in (obj.get("binaryData") or {}).items()})
    return out


def resolve_env(pod: Mapping[str, Any], container: Mapping[str, Any], inputs: PodInputs, where: str) -> dict[str, str]:
    """The container's own environment as the kubelet builds it: envFrom, then env in order with ``$(VAR)``."""
    env: dict[str, str] = {}
    for position, source in enumerate(container.get("envFrom") or []):
        at = f"{where}.envFrom[{position}]"
        prefix = str(source.get("prefix") or "")
        for kind, key in (("configmap", "configMapRef"), ("secret", "secretRef")):
            if key not in source:
                continue
            ref = source[key] or {}
            objects = inputs.config_maps if kind == "configmap" else inputs.secrets
            obj = objects.get(str(ref.get("name", "")))
            if obj is None:
                if ref.get("optional"):
                    continue
                raise PlanError(at, f'{kind} "{ref.get("name")}" not found')
            for name, value in _object_data(kind, obj).items():
                env[prefix + name] = value.decode("utf-8", errors="replace")
    for position, item in enumerate(container.get("env") or []):
        at = f"{where}.env[{position}]"
        name = item.get("name")
        if not name:
            raise PlanError(f"{at}.name", "an environment variable needs a name", retry=False)
        if "valueFrom" not in item:
            env[name] = expand_references(str(item.get("value", "")), env)
            continue
        source = item.get("valueFrom") or {}
        resolved: str | None
        if "fieldRef" in source:
            resolved = _field_ref(pod, str((source["fieldRef"] or {}).get("fieldPath", "")), inputs,
                                  f"{at}.valueFrom.fieldRef")
        elif "resourceFieldRef" in source:
            resolved = _resource_ref(pod, container, source["resourceFieldRef"] or {}, inputs,
                                     f"{at}.valueFrom.resourceFieldRef")
        elif "configMapKeyRef" in source:
            resolved = _key_ref("configmap", source["configMapKeyRef"] or {}, inputs.config_maps,
                                f"{at}.valueFrom.configMapKeyRef")
        elif "secretKeyRef" in source:
            resolved = _key_ref("secret", source["secretKeyRef"] or {}, inputs.secrets, f"{at}.valueFrom.secretKeyRef")
        else:
            raise PlanError(f"{at}.valueFrom", f"value source {sorted(source)} is not supported", retry=False)
        if resolved is not None:
            env[name] = resolved
    return env


def _items(kind: str, source: Mapping[str, Any], objects: Mapping[str, Mapping[str, Any]],
           where: str) -> dict[str, bytes]:
    """The files a configMap/secret volume (or projection) contributes, by relative path."""
    name = str(source.get("name") or source.get("secretName") or "")
    obj = objects.get(name)
    if obj is None:
        if source.get("optional"):
            return {}
        raise PlanError(where, f'{kind} "{name}" not found')
    data = _object_data(kind, obj)
    items = source.get("items")
    if not items:
        return dict(data)
    files: dict[str, bytes] = {}
    for item in items:
        key = str(item.get("key", ""))
        if key not in data:
            if source.get("optional"):
                continue
            raise PlanError(where, f"configmap references non-existent config key: {key}"
                            if kind == "configmap" else f"references non-existent secret key: {key}")
        files[str(item.get("path") or key)] = data[key]
    return files


def _downward_items(pod: Mapping[str, Any], items: Iterable[Mapping[str, Any]], inputs: PodInputs,
                    where: str) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    containers = {c.get("name"): c for c in (pod.get("spec") or {}).get("containers") or []}
    for position, item in enumerate(items):
        at = f"{where}.items[{position}]"
        if "fieldRef" in item:
            value = _field_ref(pod, str((item["fieldRef"] or {}).get("fieldPath", "")), inputs, f"{at}.fieldRef")
        elif "resourceFieldRef" in item:
            ref = item["resourceFieldRef"] or {}
            container = containers.get(ref.get("containerName")) or next(iter(containers.values()), {})
            value = _resource_ref(pod, container, ref, inputs, f"{at}.resourceFieldRef")
        else:
            raise PlanError(at, "a downwardAPI item needs fieldRef or resourceFieldRef", retry=False)
        files[str(item.get("path", ""))] = value.encode()
    return files


def _volume_files(pod: Mapping[str, Any], index: int, volume: Mapping[str, Any],
                  inputs: PodInputs) -> tuple[Path, dict[str, bytes]]:
    """(host directory, files by relative path) of one pod volume."""
    where = f"spec.volumes[{index}]"
    name = str(volume.get("name", ""))
    namespace = (pod.get("metadata") or {}).get("namespace", "default")
    directory = inputs.pod_dir / "volumes" / name
    if "emptyDir" in volume:
        return directory, {}
    if "configMap" in volume:
        return directory, _items("configmap", volume["configMap"] or {}, inputs.config_maps, f"{where}.configMap")
    if "secret" in volume:
        return directory, _items("secret", volume["secret"] or {}, inputs.secrets, f"{where}.secret")
    if "downwardAPI" in volume:
        return directory, _downward_items(pod, (volume["downwardAPI"] or {}).get("items") or [], inputs,
                                          f"{where}.downwardAPI")
    if "persistentVolumeClaim" in volume:
        claim = str((volume["persistentVolumeClaim"] or {}).get("claimName", ""))
        return inputs.pvc_root / namespace / claim, {}
    if "projected" in volume:
        files: dict[str, bytes] = {}
        for position, source in enumerate((volume["projected"] or {}).get("sources") or []):
            at = f"{where}.projected.sources[{position}]"
            if "serviceAccountToken" in source:
                path = str((source["serviceAccountToken"] or {}).get("path", "token"))
                token = inputs.tokens.get((name, path))
                if token is None:
                    raise PlanError(f"{at}.serviceAccountToken", "no token issued for this projection yet")
                files[path] = token.encode()
            elif "configMap" in source:
                files.update(_items("configmap", source["configMap"] or {}, inputs.config_maps, f"{at}.configMap"))
            elif "secret" in source:
                files.update(_items("secret", source["secret"] or {}, inputs.secrets, f"{at}.secret"))
            elif "downwardAPI" in source:
                files.update(_downward_items(pod, (source["downwardAPI"] or {}).get("items") or [], inputs,
                                             f"{at}.downwardAPI"))
            else:
                raise PlanError(at, f"projected source {sorted(source)} is not supported by the node agent",
                                retry=False)
        return directory, files
    kinds = sorted(key for key in volume if key != "name")
    raise PlanError(where, f"volume type {kinds} is not supported by the node agent", retry=False)


def service_account_tokens(pod: Mapping[str, Any]) -> list[tuple[str, str, str | None, int]]:
    """(volume, path, audience, expirationSeconds) of every projected serviceAccountToken source."""
    found = []
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        for source in ((volume.get("projected") or {}).get("sources") or []):
            token = source.get("serviceAccountToken")
            if token is not None:
                found.append((str(volume.get("name")), str(token.get("path", "token")), token.get("audience") or None,
                              int(token.get("expirationSeconds") or DEFAULT_TOKEN_EXPIRATION_SECONDS)))
    return found


def referenced_objects(pod: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """Names of the ConfigMaps and Secrets the pod reads (volumes, projections, env, envFrom)."""
    config_maps: set[str] = set()
    secrets: set[str] = set()
    spec = pod.get("spec") or {}
    for volume in spec.get("volumes") or []:
        if "configMap" in volume:
            config_maps.add(str(volume["configMap"].get("name", "")))
        if "secret" in volume:
            secrets.add(str(volume["secret"].get("secretName", "")))
        for source in ((volume.get("projected") or {}).get("sources") or []):
            if "configMap" in source:
                config_maps.add(str(source["configMap"].get("name", "")))
            if "secret" in source:
                secrets.add(str(source["secret"].get("name", "")))
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        for source in container.get("envFrom") or []:
            if "configMapRef" in source:
                config_maps.add(str(source["configMapRef"].get("name", "")))
            if "secretRef" in source:
                secrets.add(str(source["secretRef"].get("name", "")))
        for item in container.get("env") or []:
            value_from = item.get("valueFrom") or {}
            if "configMapKeyRef" in value_from:
                config_maps.add(str(value_from["configMapKeyRef"].get("name", "")))
            if "secretKeyRef" in value_from:
                secrets.add(str(value_from["secretKeyRef"].get("name", "")))
    return config_maps, secrets


def pod_kubeconfig(server: str, ca_path: Path, token_path: Path, token: str, namespace: str) -> str:
    """A kubeconfig whose user is the pod's ServiceAccount token (inline for Kopf, tokenFile for rotation)."""
    document = {
        "apiVersion": "v1", "kind": "Config", "current-context": "pod",
        "clusters": [{"name": "in-cluster", "cluster": {"server": server, "certificate-authority": str(ca_path)}}],
        "users": [{"name": "service-account", "user": {"token": token, "tokenFile": str(token_path)}}],
        "contexts": [{"name": "pod", "context": {"cluster": "in-cluster", "user": "service-account",
                                                 "namespace": namespace}}],
    }
    return json.dumps(document, indent=2) + "\n"


def _thread_budget(container: Mapping[str, Any]) -> str:
    """OMP_NUM_THREADS a CPU-quota-aware runtime would imply: the CPU limit, else request, rounded up (min 1)."""
    resources = container.get("resources") or {}
    for kind in ("limits", "requests"):
        value = (resources.get(kind) or {}).get("cpu")
        if value is not None:
            with contextlib.suppress(PlanError):
                return str(max(1, math.ceil(parse_quantity(value))))
    return "1"


def plan_pod(pod: Mapping[str, Any], inputs: PodInputs) -> PodPlan:
    """Translate a pod bound to this node into files to write and local commands to run. Pure.

    Raises PlanError naming the pod field when something is missing (retryable) or unsupported (not).
    """
    spec = pod.get("spec") or {}
    metadata = pod.get("metadata") or {}
    namespace = str(metadata.get("namespace", "default"))
    volumes: dict[str, Path] = {}
    files: dict[Path, bytes] = {}
    directories: list[Path] = [inputs.pod_dir / "logs"]
    for index, volume in enumerate(spec.get("volumes") or []):
        directory, volume_files = _volume_files(pod, index, volume, inputs)
        volumes[str(volume.get("name"))] = directory
        directories.append(directory)
        for relative, content in volume_files.items():
            files[directory / relative] = content

    all_containers = [*(("initContainers", c) for c in spec.get("initContainers") or []),
                      *(("containers", c) for c in spec.get("containers") or [])]
    if not spec.get("containers"):
        raise PlanError("spec.containers", "the pod has no containers", retry=False)

    def mounts_of(container: Mapping[str, Any], where: str) -> list[Mount]:
        mounts = []
        for position, mount in enumerate(container.get("volumeMounts") or []):
            name = str(mount.get("name", ""))
            if name not in volumes:
                raise PlanError(f"{where}.volumeMounts[{position}]", f"volume {name!r} is not in spec.volumes",
                                retry=False)
            host = volumes[name] / mount["subPath"] if mount.get("subPath") else volumes[name]
            mounts.append(Mount(str(mount.get("mountPath", "")), host))
        return mounts

    pod_table = MountTable.of(m for kind, c in all_containers for m in mounts_of(c, f"spec.{kind}"))
    for path, content in list(files.items()):
        if path.suffix == ".json":
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                files[path] = (json.dumps(pod_table.rewrite_json(json.loads(content.decode())), indent=2,
                                          sort_keys=True) + "\n").encode()

    kubeconfig: Path | None = None
    host, _, port = inputs.api_server.removeprefix("https://").removeprefix("http://").partition(":")
    runtime_env: dict[str, str] = {
        "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port or "443",
        "KUBERNETES_SERVICE_PORT_HTTPS": port or "443", "KUBERNETES_PORT": f"tcp://{host}:{port or '443'}",
        "HOSTNAME": str(spec.get("hostname") or metadata.get("name", "")),
        "HOME": str(inputs.pod_dir / "home"),
        "JEST_METRICS_HOST": inputs.pod_ip,
        "GLOO_SOCKET_IFNAME": "lo",
    }
    directories.append(inputs.pod_dir / "home")

    plans: dict[str, list[ContainerPlan]] = {"initContainers": [], "containers": []}
    positions = {"initContainers": 0, "containers": 0}
    for kind, container in all_containers:
        where = f"spec.{kind}[{positions[kind]}]"
        positions[kind] += 1
        name = str(container.get("name", ""))
        message_path = str(container.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH)
        # the kubelet bind-mounts a per-container file at terminationMessagePath; here the path is rewritten
        # to that file wherever the container names it (a path under a volume stays in the volume)
        own_mounts = mounts_of(container, where)
        message_file = MountTable.of(own_mounts).rewrite_path(message_path)
        if message_file is None:
            message_file = str(inputs.pod_dir / "termination" / f"{kind}-{name}")
            directories.append(inputs.pod_dir / "termination")
            own_mounts.append(Mount(message_path, Path(message_file)))
        table = MountTable.of(own_mounts)
        container_env = dict(runtime_env)
        sa_dir = table.rewrite_path(SERVICE_ACCOUNT_MOUNT)
        if sa_dir is not None and Path(sa_dir) / "token" in files:
            kubeconfig = inputs.pod_dir / "kubeconfig"
            files[Path(sa_dir) / "ca.crt"] = files.get(Path(sa_dir) / "ca.crt") or inputs.ca_pem.encode()
            files[kubeconfig] = pod_kubeconfig(inputs.api_server, Path(sa_dir) / "ca.crt", Path(sa_dir) / "token",
                                               files[Path(sa_dir) / "token"].decode(), namespace).encode()
            container_env["KUBECONFIG"] = str(kubeconfig)
        tmp = table.rewrite_path("/tmp")
        if tmp is not None:
            container_env["TMPDIR"] = tmp
        if "OMP_NUM_THREADS" not in inputs.base_env:
            container_env["OMP_NUM_THREADS"] = _thread_budget(container)
        own = resolve_env(pod, container, inputs, where)
        own = localize_addresses(own, inputs.resolve, inputs.map_port)
        own = {name: table.rewrite(value) for name, value in own.items()}
        env = {**container_env, **own}
        raw_argv = [*(container.get("command") or []), *(container.get("args") or [])]
        if not container.get("command"):
            raise PlanError(f"{where}.command", "the container has no command (an image entrypoint cannot run "
                            "on the node agent)", retry=False)
        argv = [table.rewrite(localize_value(expand_references(str(part), env), inputs.resolve,
                                             f"{where}.args[{position}]")[0])
                for position, part in enumerate(raw_argv)]
        try:
            argv[0] = resolve_executable(argv[0])
        except ValueError as error:
            raise PlanError(f"{where}.command", str(error).split(": ", 1)[-1], reason="RunContainerError",
                            retry=False) from error
        working = str(container.get("workingDir") or "")
        cwd = Path(table.rewrite_path(working) or inputs.pod_dir / "rootfs" / working.lstrip("/")) if working \
            else inputs.pod_dir / "rootfs"
        directories.append(cwd)
        plans[kind].append(ContainerPlan(
            name=name, init=kind == "initContainers", command=LocalCommand(argv=argv, env=env, cwd=cwd),
            spec=container, termination_message_file=Path(message_file),
            log_path=inputs.pod_dir / "logs" / f"{name}.log"))
    return PodPlan(directories=directories, files=files, init_containers=plans["initContainers"],
                   containers=plans["containers"], kubeconfig=kubeconfig)


def process_environment(base: Mapping[str, str]) -> dict[str, str]:
    """What a pod process inherits from the agent: PATH, locale and thread limits only (never credentials)."""
    return {key: value for key, value in base.items() if PASS_THROUGH_ENV.match(key)}


# ------------------------------------------------------------------------------------------------- status
@dataclass
class ContainerState:
    """What the agent knows about one container, in the shape containerStatuses needs."""

    name: str
    image: str = ""
    state: str = "waiting"  # waiting | running | terminated
    reason: str = "ContainerCreating"
    message: str = ""
    exit_code: int | None = None
    signal: int | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    restart_count: int = 0
    ready: bool = False
    pid: int | None = None
    last_terminated: dict[str, Any] | None = None

    def terminated_wire(self) -> dict[str, Any]:
        """The ``terminated`` state as the API wants it."""
        wire: dict[str, Any] = {"exitCode": int(self.exit_code if self.exit_code is not None else 137),
                                "reason": self.reason or ("Completed" if self.exit_code == 0 else "Error")}
        if self.signal is not None:
            wire["signal"] = self.signal
        if self.message:
            wire["message"] = self.message
        if self.started_at is not None:
            wire["startedAt"] = rfc3339(self.started_at)
        if self.finished_at is not None:
            wire["finishedAt"] = rfc3339(self.finished_at)
        if self.pid is not None:
            wire["containerID"] = f"local://{self.pid}"
        return wire

    def to_wire(self) -> dict[str, Any]:
        """One entry of containerStatuses / initContainerStatuses."""
        if self.state == "running":
            state: dict[str, Any] = {"running": {"startedAt": rfc3339(self.started_at or now_utc())}}
        elif self.state == "terminated":
            state = {"terminated": self.terminated_wire()}
        else:
            waiting: dict[str, Any] = {"reason": self.reason or "ContainerCreating"}
            if self.message:
                waiting["message"] = self.message
            state = {"waiting": waiting}
        wire: dict[str, Any] = {"name": self.name, "image": self.image, "imageID": "", "ready": self.ready,
                                "restartCount": self.restart_count, "started": self.state == "running",
                                "state": state, "lastState": {}}
        if self.last_terminated:
            wire["lastState"] = {"terminated": self.last_terminated}
        if self.pid is not None and self.state != "waiting":
            wire["containerID"] = f"local://{self.pid}"
        return wire


def pod_phase(restart_policy: str, init: list[ContainerState], containers: list[ContainerState],
              terminating: bool = False) -> str:
    """The kubelet's phase rule for the states the agent reports.

    A pod being deleted whose containers have all stopped is terminal whatever its restartPolicy (the
    kubelet moves deleted pods to Succeeded/Failed before the object goes).
    """
    policy = "Never" if terminating else (restart_policy or "Always")
    for state in init:
        if state.state == "terminated" and state.exit_code != 0 and policy == "Never":
            return "Failed"
    if any(state.state != "terminated" or state.exit_code != 0 for state in init):
        return "Pending"
    if all(state.state == "waiting" and state.restart_count == 0 for state in containers):
        return "Pending"
    if all(state.state == "terminated" for state in containers):
        failed = any(state.exit_code != 0 for state in containers)
        if policy == "Never":
            return "Failed" if failed else "Succeeded"
        if policy == "OnFailure" and not failed:
            return "Succeeded"
    return "Running"


def _condition(type_: str, ok: bool, previous: Mapping[str, Mapping[str, Any]], now: dt.datetime,
               reason: str = "", message: str = "") -> dict[str, Any]:
    status = "True" if ok else "False"
    before = previous.get(type_) or {}
    since = before.get("lastTransitionTime") if before.get("status") == status else None
    condition: dict[str, Any] = {"type": type_, "status": status, "lastProbeTime": None,
                                 "lastTransitionTime": since or rfc3339(now)}
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return condition


def pod_status(pod: Mapping[str, Any], *, init: list[ContainerState], containers: list[ContainerState],
               pod_ip: str | None, host_ip: str, start_time: dt.datetime, now: dt.datetime,
               terminating: bool = False) -> dict[str, Any]:
    """The status the agent writes: phase, conditions (transition times kept), container states, addresses."""
    spec = pod.get("spec") or {}
    previous = {c.get("type"): c for c in (pod.get("status") or {}).get("conditions") or []}
    phase = pod_phase(str(spec.get("restartPolicy") or "Always"), init, containers, terminating)
    initialized = all(state.state == "terminated" and state.exit_code == 0 for state in init)
    unready = [state.name for state in containers if not state.ready]
    terminal = phase in ("Succeeded", "Failed")
    if terminal:
        ready_reason, ready_message = "PodCompleted", ""
    elif unready:
        ready_reason, ready_message = "ContainersNotReady", f"containers with unready status: [{' '.join(unready)}]"
    else:
        ready_reason, ready_message = "", ""
    ready = not unready and not terminal
    init_unready = [state.name for state in init if not (state.state == "terminated" and state.exit_code == 0)]
    conditions = [
        _condition("PodReadyToStartContainers", pod_ip is not None, previous, now),
        _condition("Initialized", initialized, previous, now,
                   "" if initialized else "ContainersNotInitialized",
                   "" if initialized else f"containers with incomplete status: [{' '.join(init_unready)}]"),
        _condition("Ready", ready, previous, now, ready_reason, ready_message),
        _condition("ContainersReady", ready, previous, now, ready_reason, ready_message),
        _condition("PodScheduled", True, previous, now),
    ]
    status: dict[str, Any] = {
        "phase": phase, "conditions": conditions, "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
        "startTime": rfc3339(start_time), "containerStatuses": [state.to_wire() for state in containers],
    }
    if init:
        status["initContainerStatuses"] = [state.to_wire() for state in init]
    if pod_ip is not None:
        status["podIP"] = pod_ip
        status["podIPs"] = [{"ip": pod_ip}]
    return status


def unschedulable_status(pod: Mapping[str, Any], result: Fit, now: dt.datetime) -> dict[str, Any] | None:
    """The PodScheduled=False patch for a pod that does not fit, or None when the pod already says so."""
    previous = {c.get("type"): c for c in (pod.get("status") or {}).get("conditions") or []}
    current = previous.get("PodScheduled") or {}
    if current.get("status") == "False" and current.get("message") == result.message:
        return None
    condition = _condition("PodScheduled", False, previous, now, "Unschedulable", result.message)
    return {"phase": "Pending", "conditions": [condition]}


def exit_details(code: int) -> tuple[int, int | None]:
    """(exitCode, signal) in container terms: a process killed by signal N exits 128 + N."""
    if code < 0:
        return 128 - code, -code
    return code, None


def termination_message(plan: ContainerPlan, log_tail: list[str], failed: bool) -> str:
    """The terminationMessagePath file, else (FallbackToLogsOnError and a failure) the log tail; capped at 4 KiB."""
    text = ""
    if plan.termination_message_file is not None:
        with contextlib.suppress(OSError):
            text = plan.termination_message_file.read_text(errors="replace")
    if not text and failed and plan.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
        text = "\n".join(log_tail[-FALLBACK_LOG_LINES:])
    encoded = text.encode()[-MAX_TERMINATION_MESSAGE_BYTES:]
    return encoded.decode(errors="replace")


def log_slice(data: bytes, *, tail_lines: int | None = None, limit_bytes: int | None = None) -> bytes:
    """What ``kubectl logs --tail N --limit-bytes M`` returns of a log: the last N lines, then the first M bytes."""
    if tail_lines is not None:
        lines = data.splitlines(keepends=True)
        data = b"".join(lines[-tail_lines:]) if tail_lines > 0 else b""
    if limit_bytes is not None:
        data = data[:limit_bytes]
    return data


_LOG_PATH = re.compile(r"^/containerLogs/([a-z0-9.-]+)/([a-z0-9.-]+)/([a-z0-9.-]+)$")


# ---------------------------------------------------------------------------------------------------- I/O
def _free_wildcard_port() -> int:
    """A TCP port free on every interface (TCPStore listens on all of them)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def default_pod_ip_base(server: str) -> str:
    """``127.<n>.0.10`` with ``n`` from the API server's port, so two dev clusters on one host (the user's
    ``make cluster-up`` and a test session's) hand out different pod addresses and their fixed ports never meet."""
    port = server.rsplit(":", 1)[-1].strip("/")
    return f"127.{1 + int(port) % 250 if port.isdigit() else 0}.0.10"


class IpPool:
    """Loopback addresses for pods, handed out in order and never reused while the agent runs."""

    def __init__(self, base: str = DEFAULT_POD_IP_BASE) -> None:
        self._next = int(ipaddress.IPv4Address(base))
        self._last = int(ipaddress.IPv4Address("127.255.255.254"))
        self._lock = threading.Lock()

    def reserve(self, address: str) -> None:
        """Never hand out ``address`` (a pod an earlier agent ran keeps its IP) nor any before it."""
        with self._lock:
            self._next = max(self._next, int(ipaddress.IPv4Address(address)) + 1)

    def allocate(self) -> str:
        """The next address (127.x.y.0 and .255 skipped)."""
        with self._lock:
            while True:
                if self._next > self._last:
                    raise RuntimeError("the node agent ran out of loopback pod addresses")
                address = ipaddress.IPv4Address(self._next)
                self._next += 1
                if address.packed[-1] not in (0, 255):
                    return str(address)


class Api:
    """The few API calls the agent makes, as plain JSON dicts over the official client (admin kubeconfig)."""

    def __init__(self, kubeconfig: Path) -> None:
        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        configuration.connection_pool_maxsize = 16
        self.configuration = configuration
        self.client = client.ApiClient(configuration)
        self.core = client.CoreV1Api(self.client)
        self.coordination = client.CoordinationV1Api(self.client)
        self.server = str(configuration.host)

    def ca_pem(self) -> str:
        """The cluster CA the agent trusts (written as ca.crt next to each pod's token)."""
        path = self.configuration.ssl_ca_cert
        return Path(path).read_text() if path else ""

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        return json.loads(response.data) if response.data else {}

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Call a typed client method without model decoding; ApiException propagates."""
        return self._json(function(*args, _preload_content=False, _request_timeout=15, **kwargs))

    @staticmethod
    def status_of(error: Exception) -> int | None:
        """The HTTP status of an ApiException, else None."""
        status = getattr(error, "status", None)
        return int(status) if isinstance(status, int) else None


@dataclass
class _Container:
    """A running (or finished) container: its plan, process, state and probe bookkeeping."""

    plan: ContainerPlan | None
    state: ContainerState
    process: LocalPodProcess | None = None
    next_start: float = 0.0
    probe_due: dict[str, float] = field(default_factory=dict)
    probe_failures: dict[str, int] = field(default_factory=dict)


@dataclass
class PodWorker:
    """One pod on this node: from preparation through running to its deletion."""

    uid: str
    pod: dict[str, Any]
    pod_ip: str
    pod_dir: Path
    start_time: dt.datetime
    init: list[_Container] = field(default_factory=list)
    containers: list[_Container] = field(default_factory=list)
    prepared: bool = False
    waiting_reason: str = "ContainerCreating"
    waiting_message: str = ""
    next_prepare: float = 0.0
    kill_deadline: float | None = None
    terminating: bool = False
    finished: bool = False
    last_status: str = ""
    tokens: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        """(namespace, name)."""
        metadata = self.pod.get("metadata") or {}
        return str(metadata.get("namespace", "default")), str(metadata.get("name", ""))

    def processes(self) -> list[LocalPodProcess]:
        """Every process this pod started that has not been reaped."""
        return [c.process for c in [*self.init, *self.containers] if c.process is not None and c.process.poll() is None]


class NodeAgent:
    """Registers one Node and runs the pods bound to it as local processes (see the module docstring).

    ``start()`` returns once the Node is registered and the threads run; ``stop()`` kills every process
    group this agent started and joins its threads. All processes are started from the agent's loop thread
    with ``die_with_parent``, so even a SIGKILLed agent leaves no worker behind.
    """

    def __init__(self, kubeconfig: Path, workdir: Path, *, node: NodeSpec | None = None,
                 pod_ip_base: str | None = None, extra_env: Mapping[str, str] | None = None,
                 resync_seconds: float = 0.5, heartbeat_seconds: float = 10.0,
                 shutdown_grace_seconds: float = 5.0) -> None:
        self.kubeconfig = Path(kubeconfig)
        self.workdir = Path(workdir)
        self.node = node or NodeSpec(capacity=machine_capacity())
        if not self.node.capacity:
            self.node = NodeSpec(name=self.node.name, labels=self.node.labels, taints=self.node.taints,
                                 capacity=machine_capacity(), host_ip=self.node.host_ip)
        self.base_env = {**process_environment(os.environ), **(extra_env or {})}
        self.resync_seconds = resync_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.shutdown_grace_seconds = shutdown_grace_seconds
        self.api = Api(self.kubeconfig)
        self.pod_ip_base = pod_ip_base or default_pod_ip_base(self.api.server)
        self.ips = IpPool(self.pod_ip_base)
        self.errors: list[str] = []
        self._pods: dict[str, dict[str, Any]] = {}
        self._pods_lock = threading.Lock()
        self._workers: dict[str, PodWorker] = {}
        self._ports: dict[tuple[str, int], int] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ready_since = now_utc()
        self._ca_pem = ""
        self._namespaces: dict[str, tuple[bool, float]] = {}
        self._log_server: ThreadingHTTPServer | None = None
        self.kubelet_port = 0

    # ---------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Register the Node and its Lease, then start the watch, loop and heartbeat threads."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._ca_pem = self.api.ca_pem()
        self._serve_logs()
        self._register()
        for name, target in (("watch", self._watch_loop), ("loop", self._main_loop), ("heartbeat", self._heartbeat)):
            thread = threading.Thread(target=target, name=f"node-agent-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if not self._synced.wait(timeout=30):
            LOG.warning("the first pod listing took longer than 30 s")
        LOG.info("node %s registered; pods get loopback addresses from %s", self.node.name, self.pod_ip_base)

    def stop(self) -> None:
        """Kill every process this agent started (SIGTERM, then SIGKILL after the shutdown grace), join threads."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            if thread.name == "node-agent-loop":
                thread.join(timeout=self.shutdown_grace_seconds + 20)
        self._kill_all()
        if self._log_server is not None:
            self._log_server.shutdown()
            self._log_server.server_close()
        for thread in self._threads:
            thread.join(timeout=2)

    def _kill_all(self) -> None:
        processes = [p for worker in list(self._workers.values()) for p in worker.processes()]
        for process in processes:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_grace_seconds
        for process in processes:
            if process.wait(timeout=max(0.0, deadline - time.monotonic())) is None:
                process.kill()

    def running_pods(self) -> dict[tuple[str, str], str]:
        """(namespace, name) -> pod IP of every pod with a live process (for tests and status)."""
        return {worker.key: worker.pod_ip for worker in list(self._workers.values()) if worker.processes()}

    def pod_dir(self, namespace: str, name: str) -> Path | None:
        """The directory of the newest pod object with that name this agent ran, if any."""
        candidates = sorted(self.workdir.glob(f"pods/{namespace}_{name}_*"), key=lambda p: p.stat().st_mtime)
        return candidates[-1] if candidates else None

    # ------------------------------------------------------------------------------------ kubelet logs
    def _serve_logs(self) -> None:
        """Start the HTTPS endpoint the API server proxies ``kubectl logs`` to (skipped without openssl)."""
        openssl = shutil.which("openssl")
        ca_path = self.api.configuration.ssl_ca_cert
        if openssl is None or not ca_path:
            LOG.warning("no openssl or no cluster CA: kubectl logs will not work (logs are under %s)", self.workdir)
            return
        pki = self.workdir / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        key, cert = pki / "kubelet.key", pki / "kubelet.crt"
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "365", "-subj", f"/CN={self.node.name}",
                        "-addext", f"subjectAltName=IP:{self.node.host_ip},DNS:{self.node.name}"],
                       check=True, capture_output=True)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.verify_mode = ssl.CERT_REQUIRED  # only the API server (a client cert of the cluster CA) may ask
        context.load_verify_locations(ca_path)
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                LOG.debug("kubelet endpoint: " + format, *args)

            def do_GET(self) -> None:
                agent._answer_logs(self)

        server = ThreadingHTTPServer((self.node.host_ip, 0), Handler)
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._log_server = server
        self.kubelet_port = int(server.server_address[1])
        thread = threading.Thread(target=server.serve_forever, name="node-agent-kubelet-endpoint", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _answer_logs(self, request: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(request.path)
        if url.path == "/healthz":
            self._reply(request, 200, b"ok")
            return
        match = _LOG_PATH.match(url.path)
        if match is None:
            self._reply(request, 404, b"the jest node agent serves only /containerLogs/<ns>/<pod>/<container>\n")
            return
        namespace, pod, container = match.groups()
        query = urllib.parse.parse_qs(url.query)

        def number(name: str) -> int | None:
            value = (query.get(name) or [None])[0]
            return int(value) if value is not None and value.lstrip("-").isdigit() else None

        directory = self.pod_dir(namespace, pod)
        path = directory / "logs" / f"{container}.log" if directory is not None else None
        if path is None or not path.exists():
            self._reply(request, 404, f'container "{container}" in pod "{pod}" has no log on this node\n'.encode())
            return
        follow = (query.get("follow") or ["false"])[0] == "true"
        data = path.read_bytes()
        limit = number("limitBytes")
        first = log_slice(data, tail_lines=number("tailLines"), limit_bytes=limit)
        request.send_response(200)
        request.send_header("Content-Type", "text/plain")
        if not follow:
            request.send_header("Content-Length", str(len(first)))
        request.end_headers()
        sent = len(first)
        try:
            request.wfile.write(first)
            request.wfile.flush()
            offset = len(data)
            while follow and (limit is None or sent < limit) and not self._stop.is_set():
                with path.open("rb") as log:
                    log.seek(offset)
                    more = log.read()
                if more:
                    more = more if limit is None else more[:limit - sent]
                    request.wfile.write(more)
                    request.wfile.flush()
                    offset += len(more)
                    sent += len(more)
                    continue
                if not self._pod_running(namespace, pod):
                    break
                time.sleep(0.5)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            return

    def _pod_running(self, namespace: str, name: str) -> bool:
        return any(worker.key == (namespace, name) and worker.processes() for worker in list(self._workers.values()))

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, code: int, body: bytes) -> None:
        request.send_response(code)
        request.send_header("Content-Type", "text/plain")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    # -------------------------------------------------------------------------------------------- node
    def _register(self) -> None:
        core = self.api.core
        try:
            self.api.call(core.create_node, node_manifest(self.node))
        except Exception as error:
            if Api.status_of(error) != 409:
                raise
            self.api.call(core.patch_node, self.node.name, {"metadata": {"labels": self.node.all_labels()},
                                                            "spec": {"taints": [dict(t) for t in self.node.taints]
                                                                     or None}},
                          _content_type=MERGE_PATCH)
        self._ready_since = now_utc()
        self._post_node_status()
        self._renew_lease()

    def _post_node_status(self) -> None:
        body = {"status": node_status(self.node, now_utc(), self._ready_since, self.kubelet_port)}
        self.api.call(self.api.core.patch_node_status, self.node.name, body, _content_type=STRATEGIC_MERGE_PATCH)

    def _renew_lease(self) -> None:
        lease = lease_manifest(self.node.name, now_utc())
        coordination = self.api.coordination
        try:
            self.api.call(coordination.patch_namespaced_lease, self.node.name, NODE_LEASE_NAMESPACE,
                          {"spec": lease["spec"]}, _content_type=MERGE_PATCH)
        except Exception as error:
            if Api.status_of(error) != 404:
                raise
            self.api.call(coordination.create_namespaced_lease, NODE_LEASE_NAMESPACE, lease)

    def _heartbeat(self) -> None:
        beats = 0
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                self._renew_lease()
                beats += 1
                if beats % 4 == 0:
                    self._post_node_status()
            except Exception as error:  # the API server may be restarting; keep beating
                LOG.warning("heartbeat failed: %s", error)

    # ------------------------------------------------------------------------------------------- watch
    def _watch_loop(self) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        core = self.api.core
        while not self._stop.is_set():
            try:
                listing = self.api.call(core.list_pod_for_all_namespaces)
                with self._pods_lock:
                    self._pods = {p["metadata"]["uid"]: p for p in listing.get("items") or []}
                version = listing["metadata"]["resourceVersion"]
                self._synced.set()
                self._wake.set()
                while not self._stop.is_set():
                    response = core.list_pod_for_all_namespaces(
                        watch=True, resource_version=version, allow_watch_bookmarks=True, timeout_seconds=60,
                        _preload_content=False, _request_timeout=(10, 90))
                    try:
                        for line in iter_resp_lines(response):
                            if self._stop.is_set():
                                return
                            event = json.loads(line)
                            kind, obj = event.get("type"), event.get("object") or {}
                            if kind == "ERROR":
                                raise RuntimeError(f"watch error: {obj.get('message')}")
                            version = (obj.get("metadata") or {}).get("resourceVersion", version)
                            if kind == "BOOKMARK":
                                continue
                            uid = obj["metadata"]["uid"]
                            with self._pods_lock:
                                if kind == "DELETED":
                                    self._pods.pop(uid, None)
                                else:
                                    self._pods[uid] = obj
                            self._wake.set()
                    finally:
                        response.release_conn()
            except Exception as error:
                if not self._stop.is_set():
                    LOG.info("pod watch restarts after: %s", error)
                    self._stop.wait(1.0)

    # -------------------------------------------------------------------------------------------- loop
    def _main_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.resync_seconds)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._sync()
            except Exception as error:  # keep the node alive; report what went wrong
                LOG.exception("sync failed")
                self.errors = [*self.errors[-99:], repr(error)]

    def _snapshot(self) -> dict[str, dict[str, Any]]:
        with self._pods_lock:
            return dict(self._pods)

    def _serves_namespace(self, namespace: str) -> bool:
        """False for namespaces that opted out (label ``jest.training/node-agent=off``); cached for 10 s."""
        served, checked = self._namespaces.get(namespace, (True, -math.inf))
        if time.monotonic() - checked < NAMESPACE_CACHE_SECONDS:
            return served
        try:
            labels = (self.api.call(self.api.core.read_namespace, namespace).get("metadata") or {}).get("labels") or {}
            served = labels.get(NAMESPACE_OPT_OUT_LABEL) != NAMESPACE_OPT_OUT_VALUE
        except Exception as error:
            if Api.status_of(error) != 404:
                raise
        self._namespaces[namespace] = (served, time.monotonic())
        return served

    def _sync(self) -> None:
        """One pass over every pod; a failure on one pod (the API server restarting, a refused patch) is
        logged and retried next pass without holding up the others."""
        pods = self._snapshot()
        for uid, pod in pods.items():
            with self._isolated(pod):
                spec = pod.get("spec") or {}
                if uid not in self._workers and not self._serves_namespace(pod["metadata"]["namespace"]):
                    continue
                if wants_binding(pod):
                    self._schedule(pod)
                elif spec.get("nodeName") == self.node.name and uid not in self._workers:
                    self._adopt(pod)
                if uid in self._workers:
                    self._workers[uid].pod = pod
        for uid, worker in list(self._workers.items()):
            with self._isolated(worker.pod):
                if uid not in pods and not worker.finished:
                    worker.terminating = True  # gone from the API (force-deleted): stop at once
                    worker.kill_deadline = worker.kill_deadline or time.monotonic()
                self._tick(worker, gone=uid not in pods)
                if worker.finished and uid not in pods:
                    del self._workers[uid]

    @contextlib.contextmanager
    def _isolated(self, pod: Mapping[str, Any]) -> Iterator[None]:
        try:
            yield
        except Exception as error:
            metadata = pod.get("metadata") or {}
            LOG.warning("%s/%s: %s (retried next pass)", metadata.get("namespace"), metadata.get("name"), error)
            self.errors = [*self.errors[-99:], f"{metadata.get('namespace')}/{metadata.get('name')}: {error!r}"]

    def _schedule(self, pod: dict[str, Any]) -> None:
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        try:
            result = fit(pod, self.node)
        except PlanError as error:
            result = Fit(False, f"0/1 nodes are available: {error}")
        try:
            if result.ok:
                binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name, "namespace": namespace},
                           "target": {"apiVersion": "v1", "kind": "Node", "name": self.node.name}}
                self.api.call(self.api.core.create_namespaced_pod_binding, name, namespace, binding)
                LOG.info("bound %s/%s to %s", namespace, name, self.node.name)
                return
            patch = unschedulable_status(pod, result, now_utc())
            if patch is not None:
                self.api.call(self.api.core.patch_namespaced_pod_status, name, namespace, {"status": patch},
                              _content_type=STRATEGIC_MERGE_PATCH)
                LOG.info("%s/%s is unschedulable: %s", namespace, name, result.message)
        except Exception as error:
            if Api.status_of(error) not in (404, 409):
                raise

    def _adopt(self, pod: dict[str, Any]) -> None:
        """A pod bound to this node that no worker owns yet."""
        metadata, status = pod["metadata"], pod.get("status") or {}
        phase = status.get("phase")
        if status.get("podIP"):
            self.ips.reserve(status["podIP"])
        worker = PodWorker(uid=metadata["uid"], pod=pod, pod_ip=status.get("podIP") or self.ips.allocate(),
                           pod_dir=pod_directory(self.workdir, pod), start_time=now_utc())
        spec = pod.get("spec") or {}
        worker.init = [_Container(plan=None, state=ContainerState(name=c["name"], image=c.get("image", "")))
                       for c in spec.get("initContainers") or []]
        worker.containers = [_Container(plan=None, state=ContainerState(name=c["name"], image=c.get("image", "")))
                             for c in spec.get("containers") or []]
        self._workers[worker.uid] = worker
        if phase in ("Succeeded", "Failed"):
            worker.finished = True  # nothing left to run; only its deletion will matter
            worker.prepared = True
            return
        ran_before = any("running" in (c.get("state") or {}) or "terminated" in (c.get("state") or {})
                         for c in status.get("containerStatuses") or [])
        if ran_before and (spec.get("restartPolicy") or "Always") == "Never":
            # An earlier agent ran it and took its processes down: the containers are gone (as after a
            # kubelet restart that lost them); report that, never run a Never pod twice.
            for container in worker.containers:
                container.state = ContainerState(name=container.state.name, image=container.state.image,
                                                 state="terminated", exit_code=137, reason="ContainerStatusUnknown",
                                                 message="The container could not be located when the pod was "
                                                         "terminated", finished_at=now_utc())
            worker.prepared = True
            self._post_status(worker)
            worker.finished = True

    # ------------------------------------------------------------------------------------------ a pod
    def _resolve(self, namespace: str, hostname: str, subdomain: str) -> PodAddress | None:
        best: PodWorker | None = None
        for worker in self._workers.values():
            spec, metadata = worker.pod.get("spec") or {}, worker.pod.get("metadata") or {}
            matches = (metadata.get("namespace") == namespace and spec.get("hostname") == hostname
                       and spec.get("subdomain") == subdomain and not worker.finished)
            if matches and (best is None or (best.terminating and not worker.terminating)):
                best = worker
        if best is None:
            return None
        return PodAddress(namespace, hostname, subdomain, best.pod_ip, best.uid)

    def _map_port(self, address: PodAddress, port: int) -> int:
        key = (address.uid, port)
        if key not in self._ports:
            self._ports[key] = _free_wildcard_port()
        return self._ports[key]

    def _fetch_inputs(self, worker: PodWorker) -> PodInputs:
        pod = worker.pod
        namespace, name = worker.key
        core = self.api.core
        wanted_maps, wanted_secrets = referenced_objects(pod)
        config_maps: dict[str, Mapping[str, Any]] = {}
        secrets: dict[str, Mapping[str, Any]] = {}
        for wanted, store, reader in ((wanted_maps, config_maps, core.read_namespaced_config_map),
                                      (wanted_secrets, secrets, core.read_namespaced_secret)):
            for object_name in sorted(wanted):
                try:
                    store[object_name] = self.api.call(reader, object_name, namespace)
                except Exception as error:
                    if Api.status_of(error) != 404:
                        raise
        service_account = (pod.get("spec") or {}).get("serviceAccountName") or "default"
        for volume, path, audience, seconds in service_account_tokens(pod):
            if (volume, path) in worker.tokens:
                continue
            request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                       "spec": {"audiences": [audience] if audience else [], "expirationSeconds": seconds,
                                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": worker.uid}}}
            issued = self.api.call(core.create_namespaced_service_account_token, service_account, namespace, request)
            worker.tokens[(volume, path)] = issued["status"]["token"]
        return PodInputs(pod_ip=worker.pod_ip, pod_dir=worker.pod_dir, pvc_root=self.workdir / "pvc",
                         api_server=self.api.server, ca_pem=self._ca_pem, node=self.node, config_maps=config_maps,
                         secrets=secrets, tokens=dict(worker.tokens), resolve=self._resolve, map_port=self._map_port,
                         base_env=self.base_env)

    def _prepare(self, worker: PodWorker) -> None:
        """Materialise the pod's volumes and plan its containers; a retryable failure waits and tries again."""
        if time.monotonic() < worker.next_prepare:
            return
        try:
            plan = plan_pod(worker.pod, self._fetch_inputs(worker))
        except PlanError as error:
            worker.waiting_reason, worker.waiting_message = error.reason, str(error)
            worker.next_prepare = time.monotonic() + (1.0 if error.retry else 30.0)
            for container in [*worker.init, *worker.containers]:
                container.state.reason, container.state.message = error.reason, str(error)
            LOG.info("%s/%s waits: %s", *worker.key, error)
            return
        for directory in plan.directories:
            directory.mkdir(parents=True, exist_ok=True)
        for path, content in plan.files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.tmp")
            temporary.write_bytes(content)
            os.replace(temporary, path)
        worker.init = [_Container(plan=p, state=ContainerState(name=p.name, image=p.spec.get("image", ""),
                                                                reason="PodInitializing"))
                       for p in plan.init_containers]
        worker.containers = [_Container(plan=p, state=ContainerState(
            name=p.name, image=p.spec.get("image", ""), reason="PodInitializing" if plan.init_containers
            else "ContainerCreating")) for p in plan.containers]
        worker.prepared = True

    def _start(self, worker: PodWorker, container: _Container) -> None:
        plan = container.plan
        if plan.termination_message_file is not None:
            with contextlib.suppress(OSError):
                plan.termination_message_file.unlink()
        process = LocalPodProcess(plan.command, label=f"{worker.key[1]}/{plan.name}", sink=lambda line: None,
                                  log_path=plan.log_path, base_env=self.base_env, tail_lines=FALLBACK_LOG_LINES,
                                  die_with_parent=True)
        try:
            process.start()
        except OSError as error:
            container.state = ContainerState(name=plan.name, image=container.state.image, state="terminated",
                                             exit_code=128, reason="StartError", message=str(error),
                                             restart_count=container.state.restart_count, finished_at=now_utc())
            return
        container.process = process
        container.state = ContainerState(name=plan.name, image=container.state.image, state="running",
                                         reason="", started_at=now_utc(), restart_count=container.state.restart_count,
                                         ready=not plan.spec.get("readinessProbe"), pid=process.pid,
                                         last_terminated=container.state.last_terminated)
        container.probe_due = {}
        container.probe_failures = {}
        LOG.info("started %s/%s container %s (pid %s, %s)", *worker.key, plan.name, process.pid, worker.pod_ip)

    def _reap(self, worker: PodWorker, container: _Container) -> bool:
        """Record an exited process; True if it exited since the last look."""
        process = container.process
        if process is None or container.state.state != "running":
            return False
        code = process.poll()
        if code is None:
            return False
        exit_code, signum = exit_details(code)
        message = termination_message(container.plan, process.stderr_tail(), exit_code != 0)
        container.state = ContainerState(
            name=container.state.name, image=container.state.image, state="terminated", exit_code=exit_code,
            signal=signum, reason="Completed" if exit_code == 0 else "Error", message=message,
            started_at=container.state.started_at, finished_at=now_utc(),
            restart_count=container.state.restart_count, pid=process.pid,
            last_terminated=container.state.last_terminated)
        LOG.info("%s/%s container %s exited %d", *worker.key, container.state.name, exit_code)
        return True

    def _maybe_restart(self, worker: PodWorker, container: _Container) -> None:
        policy = (worker.pod.get("spec") or {}).get("restartPolicy") or "Always"
        state = container.state
        if worker.terminating or state.state != "terminated":
            due = time.monotonic() >= container.next_start
            if state.state == "waiting" and state.reason == "CrashLoopBackOff" and due:
                self._start(worker, container)
            return
        if policy == "Never" or (policy == "OnFailure" and state.exit_code == 0):
            return
        backoff = RESTART_BACKOFF_SECONDS[min(state.restart_count, len(RESTART_BACKOFF_SECONDS) - 1)]
        container.next_start = time.monotonic() + backoff
        container.state = ContainerState(name=state.name, image=state.image, state="waiting",
                                         reason="CrashLoopBackOff",
                                         message=f"back-off {backoff:g}s restarting failed container={state.name}",
                                         restart_count=state.restart_count + 1, last_terminated=state.terminated_wire())

    def _probe(self, worker: PodWorker, container: _Container) -> None:
        """Run due readiness/liveness probes (httpGet, tcpSocket; others count as success)."""
        if container.state.state != "running" or container.process is None:
            return
        now = time.monotonic()
        started = container.state.started_at or now_utc()
        age = (now_utc() - started).total_seconds()
        for kind in ("readinessProbe", "livenessProbe"):
            probe = container.plan.spec.get(kind)
            if not probe or age < float(probe.get("initialDelaySeconds") or 0):
                continue
            if now < container.probe_due.get(kind, 0.0):
                continue
            period = float(probe.get("periodSeconds") or 10)
            # readiness is probed every second until the first success, so Ready follows the process quickly
            container.probe_due[kind] = now + (min(period, 1.0) if kind == "readinessProbe"
                                               and not container.state.ready else period)
            ok = self._probe_once(worker, container, probe)
            failures = 0 if ok else container.probe_failures.get(kind, 0) + 1
            container.probe_failures[kind] = failures
            threshold = int(probe.get("failureThreshold") or 3)
            if kind == "readinessProbe":
                if ok:
                    container.state.ready = True
                elif failures >= threshold:
                    container.state.ready = False
            elif failures >= threshold:
                LOG.info("%s/%s container %s failed its liveness probe; restarting", *worker.key, container.state.name)
                grace = float((worker.pod.get("spec") or {}).get("terminationGracePeriodSeconds") or 30)
                threading.Thread(target=container.process.terminate, args=(grace,), daemon=True).start()

    def _probe_once(self, worker: PodWorker, container: _Container, probe: Mapping[str, Any]) -> bool:
        timeout = float(probe.get("timeoutSeconds") or 1)
        ports = {p.get("name"): p.get("containerPort") for p in container.plan.spec.get("ports") or []}

        def port_of(value: Any) -> int:
            return int(ports.get(value, value)) if not str(value).isdigit() else int(value)

        try:
            if "httpGet" in probe:
                get = probe["httpGet"]
                scheme = str(get.get("scheme") or "HTTP").lower()
                host = get.get("host") or worker.pod_ip
                url = f"{scheme}://{host}:{port_of(get.get('port'))}{get.get('path') or '/'}"
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    return 200 <= response.status < 400
            if "tcpSocket" in probe:
                sock = probe["tcpSocket"]
                with socket.create_connection((sock.get("host") or worker.pod_ip, port_of(sock.get("port"))),
                                              timeout=timeout):
                    return True
        except (OSError, ValueError, TypeError):
            return False
        return True

    def _tick(self, worker: PodWorker, *, gone: bool) -> None:
        pod = worker.pod
        metadata = pod.get("metadata") or {}
        if metadata.get("deletionTimestamp") and not worker.terminating:
            worker.terminating = True
            grace = metadata.get("deletionGracePeriodSeconds")
            if grace is None:
                grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds")
            grace = float(30 if grace is None else grace)
            worker.kill_deadline = time.monotonic() + grace
            for process in worker.processes():
                process.send_signal(signal.SIGTERM)
            LOG.info("%s/%s is being deleted: SIGTERM, SIGKILL after %g s", *worker.key, grace)
        if worker.terminating:
            self._terminate(worker, gone=gone)
            return
        if worker.finished:
            return
        if not worker.prepared:
            self._prepare(worker)
            if not worker.prepared:
                self._post_status(worker)
                return
        for container in worker.init:
            self._reap(worker, container)
            if container.state.state == "terminated" and container.state.exit_code == 0:
                continue
            self._maybe_restart(worker, container)
            if container.state.state == "waiting" and container.process is None:
                self._start(worker, container)
            break  # init containers run one at a time, in order
        else:
            for container in worker.containers:
                self._reap(worker, container)
                self._maybe_restart(worker, container)
                if container.state.state == "waiting" and container.process is None:
                    self._start(worker, container)
                self._probe(worker, container)
        self._post_status(worker)
        policy = (pod.get("spec") or {}).get("restartPolicy") or "Always"
        if pod_phase(policy, [c.state for c in worker.init], [c.state for c in worker.containers]) in (
                "Succeeded", "Failed"):
            worker.finished = True

    def _terminate(self, worker: PodWorker, *, gone: bool) -> None:
        """SIGKILL past the deadline; once every process is gone, write the final status and delete the pod."""
        if worker.processes() and worker.kill_deadline is not None and time.monotonic() >= worker.kill_deadline:
            for process in worker.processes():
                process.kill()
        for container in [*worker.init, *worker.containers]:
            self._reap(worker, container)
        if worker.processes():
            return
        if not worker.finished:
            for container in [*worker.init, *worker.containers]:
                if container.state.state == "waiting":  # never ran (or waited in back-off): it is gone now
                    container.state = ContainerState(
                        name=container.state.name, image=container.state.image, state="terminated", exit_code=137,
                        reason="ContainerStatusUnknown", message="The container was never started or was "
                        "restarting when the pod was deleted", restart_count=container.state.restart_count,
                        finished_at=now_utc(), last_terminated=container.state.last_terminated)
            if not gone:
                self._post_status(worker)
            worker.finished = True
        if gone:
            return
        namespace, name = worker.key
        try:
            self.api.call(self.api.core.delete_namespaced_pod, name, namespace, grace_period_seconds=0,
                          body={"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                                "preconditions": {"uid": worker.uid}})
            LOG.info("deleted %s/%s", namespace, name)
        except Exception as error:
            if Api.status_of(error) not in (404, 409):
                raise

    def _post_status(self, worker: PodWorker) -> None:
        """Write the derived status when it differs from the last one written (strategic merge on pods/status)."""
        init = [c.state for c in worker.init]
        containers = [c.state for c in worker.containers]
        if not worker.prepared:
            for state in [*init, *containers]:
                state.reason, state.message = worker.waiting_reason, worker.waiting_message
        status = pod_status(worker.pod, init=init, containers=containers,
                            pod_ip=worker.pod_ip if worker.prepared else None, host_ip=self.node.host_ip,
                            start_time=worker.start_time, now=now_utc(), terminating=worker.terminating)
        fingerprint = json.dumps(_without_times(status), sort_keys=True)
        if fingerprint == worker.last_status:
            return
        namespace, name = worker.key
        try:
            updated = self.api.call(self.api.core.patch_namespaced_pod_status, name, namespace, {"status": status},
                                    _content_type=STRATEGIC_MERGE_PATCH)
            worker.last_status = fingerprint
            if updated.get("metadata", {}).get("uid") == worker.uid:
                worker.pod = updated
        except Exception as error:
            if Api.status_of(error) not in (404, 409):
                raise


def _without_times(status: Mapping[str, Any]) -> Any:
    """The status without lastTransitionTime values (they alone never justify a write)."""
    clean = copy.deepcopy(dict(status))
    for condition in clean.get("conditions") or []:
        condition.pop("lastTransitionTime", None)
    return clean


# --------------------------------------------------------------------------------------------------- CLI
def _pairs(values: Iterable[str], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise SystemExit(f"node_agent: {flag} wants KEY=VALUE, got {value!r}")
        out[key] = rest
    return out


def _taints(values: Iterable[str]) -> tuple[dict[str, str], ...]:
    taints = []
    for value in values:
        body, sep, effect = value.rpartition(":")
        if not sep or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise SystemExit(f"node_agent: --taint wants KEY[=VALUE]:EFFECT, got {value!r}")
        key, _, taint_value = body.partition("=")
        taint = {"key": key, "effect": effect}
        if taint_value:
            taint["value"] = taint_value
        taints.append(taint)
    return tuple(taints)


def build_parser() -> argparse.ArgumentParser:
    """``python -m hack.devcluster.node_agent`` options."""
    parser = argparse.ArgumentParser(prog="python -m hack.devcluster.node_agent", description=__doc__.split("\n")[0])
    parser.add_argument("--kubeconfig", type=Path, required=True, help="kubeconfig with rights to nodes and pods")
    parser.add_argument("--workdir", type=Path, required=True, help="where pod directories and logs go")
    parser.add_argument("--node-name", default=DEFAULT_NODE_NAME)
    parser.add_argument("--label", action="append", default=[], help="extra node label KEY=VALUE (repeatable)")
    parser.add_argument("--taint", action="append", default=[], help="node taint KEY[=VALUE]:EFFECT (repeatable)")
    parser.add_argument("--capacity", action="append", default=[],
                        help="override a capacity entry, e.g. nvidia.com/gpu=1 (repeatable)")
    parser.add_argument("--env", action="append", default=[], help="extra environment for every pod KEY=VALUE")
    parser.add_argument("--pod-ip-base", default=None,
                        help="first loopback address for pods (default 127.<apiserver port % 250 + 1>.0.10)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT, then kill every pod process it started."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    node = NodeSpec(name=args.node_name, labels=_pairs(args.label, "--label"), taints=_taints(args.taint),
                    capacity={**machine_capacity(), **_pairs(args.capacity, "--capacity")})
    agent = NodeAgent(args.kubeconfig, args.workdir, node=node, pod_ip_base=args.pod_ip_base,
                      extra_env=_pairs(args.env, "--env"))
    stopping = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        LOG.info("signal %d: stopping the node agent", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    agent.start()
    while not stopping.wait(1.0):
        pass
    agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
