"""A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager) as local processes.

Why: the operator, the Helm chart and kubectl must meet a real API server (RBAC, admission, CEL, garbage
collection, watch semantics), and this machine has no container engine. The binaries are built from the
pinned Kubernetes release by ``hack/controlplane/build.sh`` and cached outside the checkout.

Contract: :func:`start_control_plane` returns only once ``/readyz`` answers ok and the controller manager
has made the ``default`` ServiceAccount (so pods can be created). :meth:`ControlPlane.stop` signals exactly
the process groups it started, by pid, checked against the start time recorded in ``pids.json`` so a
recycled pid is never signalled. No scheduler and no kubelet run: the node agent
(``hack.devcluster.node_agent``) binds pods and runs them as local processes.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTROLPLANE_SRC = REPO_ROOT / "hack" / "controlplane"
KUBECTL = os.environ.get("JEST_KUBECTL", "kubectl")
NODE_NAME = "jest-node-0"
SERVICE_CIDR = "10.96.0.0/16"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "jest-admin"
KCM_USER = "system:kube-controller-manager"
FRONT_PROXY_CN = "front-proxy-client"
STATE_FILE = "pids.json"

# The controllers a Deployment-to-Pod flow, namespaces, ServiceAccounts and garbage collection need.
# Node lifecycle, IPAM, volumes and cloud controllers stay off: there is no kubelet, cloud or storage.
KCM_CONTROLLERS = (
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "legacy-serviceaccount-token-cleaner-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
    "deployment-controller",
    "replicaset-controller",
    "job-controller",
    "disruption-controller",
    "ttl-after-finished-controller",
    "endpoints-controller",
    "endpointslice-controller",
    "pod-garbage-collector-controller",
    "service-cidr-controller",
)
ADMISSION_PLUGINS = (
    "NamespaceLifecycle",
    "ServiceAccount",
    "NodeRestriction",
    "OwnerReferencesPermissionEnforcement",
    "LimitRanger",
    "Priority",
    "DefaultTolerationSeconds",
    "ResourceQuota",
    "PodSecurity",
    "MutatingAdmissionWebhook",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionWebhook",
)


class ControlPlaneError(RuntimeError):
    """The control plane could not be built or started; the message names the step and its log file."""


def ensure_binaries(*, build: bool = True) -> Path:
    """Return the directory holding etcd, kube-apiserver and kube-controller-manager.

    ``JEST_CONTROLPLANE_BIN`` names a ready directory and skips the build; otherwise ``build.sh`` runs,
    which is a no-op when the cached binaries match go.mod/go.sum (and a cold build of many minutes
    when they do not). ``build=False`` only looks in the cache.
    """
    names = ("etcd", "kube-apiserver", "kube-controller-manager")
    override = os.environ.get("JEST_CONTROLPLANE_BIN")
    if override:
        bin_dir = Path(override)
    elif build:
        if shutil.which("go") is None:
            raise ControlPlaneError("the Go toolchain is missing: `go` is needed to build the control plane")
        proc = subprocess.run(
            ["bash", str(CONTROLPLANE_SRC / "build.sh")], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise ControlPlaneError(f"hack/controlplane/build.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        bin_dir = Path(proc.stdout.strip().splitlines()[-1])
    else:
        version = (CONTROLPLANE_SRC / "VERSION").read_text().strip()
        root = os.environ.get("JEST_CONTROLPLANE_CACHE", str(Path.home() / ".cache/jest-operator/controlplane"))
        bin_dir = Path(root) / version / "bin"
    missing = [n for n in names if not os.access(bin_dir / n, os.X_OK)]
    if missing:
        raise ControlPlaneError(f"missing control-plane binaries in {bin_dir}: {', '.join(missing)}")
    return bin_dir


def free_port() -> int:
    """A loopback port the OS says is free now (another process may still take it before we bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _proc_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None when no such process lives."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces, so split after its closing parenthesis.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise ControlPlaneError("the openssl CLI is missing (apt-get install openssl): it makes the certificates")
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()}")


def _new_ca(pki: Path, name: str, cn: str) -> None:
    _openssl("genrsa", "-out", f"{name}.key", "2048", cwd=pki)
    _openssl("req", "-x509", "-new", "-key", f"{name}.key", "-sha256", "-days", "3650", "-subj", f"/CN={cn}",
             "-out", f"{name}.crt", cwd=pki)


def _new_cert(pki: Path, name: str, cn: str, ca: str, ext: str) -> None:
    _openssl("genrsa", "-out", f"{name}.key", "2048", cwd=pki)
    _openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={cn}", "-out", f"{name}.csr", cwd=pki)
    (pki / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "3650", "-sha256", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=pki)


def generate_pki(pki: Path) -> None:
    """Write the cluster CA, the API server's serving certificate, the front-proxy CA and client
    certificate (the aggregation layer's request-header authentication) and the service-account key pair.

    Uses the openssl CLI (present on Debian) so no Python crypto dependency is needed. The serving
    certificate covers 127.0.0.1, localhost and the in-cluster names, so in-cluster clients whose
    KUBERNETES_SERVICE_HOST points at 127.0.0.1 verify it with the kube-root-ca.crt bundle.
    """
    pki.mkdir(parents=True, exist_ok=True)
    _new_ca(pki, "ca", "jest-devcluster-ca")
    sans = ["IP:127.0.0.1", "IP:10.96.0.1", "DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local"]
    _new_cert(pki, "apiserver", "kube-apiserver", "ca",
              "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
              f"extendedKeyUsage=serverAuth\nsubjectAltName={','.join(sans)}\n")
    # The API server's client certificate towards kubelets (logs, exec): a node agent serving the kubelet
    # port can require it, signed by the cluster CA.
    _new_cert(pki, "apiserver-kubelet-client", "kube-apiserver-kubelet-client", "ca",
              "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n")
    _new_ca(pki, "front-proxy-ca", "jest-devcluster-front-proxy-ca")
    _new_cert(pki, "front-proxy-client", FRONT_PROXY_CN, "front-proxy-ca",
              "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n")
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def render_kubeconfig(server: str, ca_pem: bytes, user: str, token: str) -> str:
    """A kubeconfig (JSON is valid YAML) with the CA inlined, so the file works wherever it is copied."""
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "jest-devcluster", "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "jest-devcluster", "context": {"cluster": "jest-devcluster", "user": user}}],
        "current-context": "jest-devcluster",
    }
    return json.dumps(doc, indent=2) + "\n"


@dataclass
class ManagedProcess:
    """One process this control plane started, in its own process group (pgid == pid)."""

    name: str
    pid: int
    start_time: int | None
    log: Path
    popen: subprocess.Popen | None = field(default=None, repr=False, compare=False)
    argv: list[str] = field(default_factory=list, repr=False)
    env: dict[str, str] | None = field(default=None, repr=False)
    cwd: Path | None = field(default=None, repr=False)

    def alive(self) -> bool:
        """True while the very process we started (same pid and start time) still runs."""
        if self.popen is not None and self.popen.poll() is not None:
            return False
        started = _proc_start_time(self.pid)
        return started is not None and started == self.start_time and not _is_zombie(self.pid)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL it after ``grace`` seconds; never touches a recycled pid."""
        if not self.alive():
            self._reap()
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.alive():
            time.sleep(0.05)
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        else:
            # The leader exited; children left in its group (pod processes) get the same signal.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        self._reap()

    def kill(self) -> None:
        """SIGKILL the process group at once (a crash, for fault tests); never touches a recycled pid."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=5)


def _die_with_parent() -> None:
    """preexec hook: the kernel SIGKILLs the child when its parent dies (PR_SET_PDEATHSIG), so a killed
    pytest leaves no control plane behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # 1 == PR_SET_PDEATHSIG


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@dataclass
class ControlPlane:
    """A running (or stopped) dev cluster: where it lives, how to reach it, and what it started."""

    workdir: Path
    server: str
    ca_path: Path
    token: str
    kubeconfig: Path
    ports: dict[str, int]
    processes: list[ManagedProcess] = field(default_factory=list)
    die_with_parent: bool = False

    @property
    def pids(self) -> dict[str, int]:
        """Name -> pid of every process this control plane started."""
        return {p.name: p.pid for p in self.processes}

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """An environment for clients: ``base`` (default os.environ) with KUBECONFIG pointing at the admin config."""
        env = dict(os.environ if base is None else base)
        env["KUBECONFIG"] = str(self.kubeconfig)
        return env

    def kubectl(self, *args: str, check: bool = True, input: str | None = None, token: str | None = None,
                timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl against this cluster (as admin, or as the bearer ``token`` given).

        ``check=True`` raises :class:`subprocess.CalledProcessError` with stderr kept, so a failing
        command shows kubectl's own message in the test report.
        """
        cmd = [KUBECTL, "--kubeconfig", str(self.kubeconfig), "--cache-dir", str(self.workdir / "kubectl-cache")]
        if token is not None:
            cmd += ["--token", token]
        proc = subprocess.run([*cmd, *args], input=input, capture_output=True, text=True, timeout=timeout,
                              check=False)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def api(self, method: str, path: str, body: object | None = None, *, token: str | None = None,
            content_type: str = "application/json", timeout: float = 10.0) -> tuple[int, object]:
        """One HTTPS request to the API server; returns (status code, decoded JSON or text)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {token or self.token}")
        if data is not None:
            req.add_header("Content-Type", content_type)
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def start_node_agent(self, *, node_name: str = NODE_NAME) -> int:
        """Start ``python -m hack.devcluster.node_agent`` on this cluster; return its pid.

        Raises :class:`ControlPlaneError` if the module does not exist or the agent exits at once.
        """
        if importlib.util.find_spec("hack.devcluster.node_agent") is None:
            raise ControlPlaneError("hack/devcluster/node_agent.py does not exist")
        node_dir = self.workdir / "node"
        node_dir.mkdir(parents=True, exist_ok=True)
        env = self.env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
        proc = self._spawn("node-agent", [sys.executable, "-m", "hack.devcluster.node_agent", "--kubeconfig",
                                          str(self.kubeconfig), "--node-name", node_name, "--workdir",
                                          str(node_dir)], env=env, cwd=REPO_ROOT)
        time.sleep(0.5)
        if not proc.alive():
            raise ControlPlaneError(f"node agent exited at once; see {proc.log}:\n{_tail(proc.log)}")
        self.write_state()
        return proc.pid

    def stop(self) -> None:
        """Stop every process this control plane started, newest first (node agent, KCM, API server, etcd)."""
        for proc in reversed(self.processes):
            proc.stop()
        self.write_state()

    def alive(self) -> dict[str, bool]:
        """Name -> whether that process still runs."""
        return {p.name: p.alive() for p in self.processes}

    def write_state(self) -> None:
        """Record pids, start times, ports and paths in ``workdir/pids.json`` (read by `down` and `status`)."""
        state = {
            "server": self.server, "ca_path": str(self.ca_path), "token": self.token,
            "kubeconfig": str(self.kubeconfig), "ports": self.ports,
            "processes": [{"name": p.name, "pid": p.pid, "start_time": p.start_time, "log": str(p.log)}
                          for p in self.processes],
        }
        (self.workdir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    @classmethod
    def load(cls, workdir: Path) -> ControlPlane:
        """Rebuild a handle from ``workdir/pids.json`` so another process can stop or inspect the cluster."""
        path = workdir / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise ControlPlaneError(f"no cluster state at {path} (is the cluster up?)") from None
        procs = [ManagedProcess(p["name"], int(p["pid"]), p["start_time"], Path(p["log"])) for p in state["processes"]]
        return cls(workdir=workdir, server=state["server"], ca_path=Path(state["ca_path"]), token=state["token"],
                   kubeconfig=Path(state["kubeconfig"]), ports=dict(state["ports"]), processes=procs)

    def _spawn(self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
               cwd: Path | None = None) -> ManagedProcess:
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            popen = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env=dict(env) if env is not None else None,
                                     cwd=str(cwd or self.workdir),
                                     preexec_fn=_die_with_parent if self.die_with_parent else None)
        proc = ManagedProcess(name, popen.pid, _proc_start_time(popen.pid), log, popen, list(argv),
                              dict(env) if env is not None else None, cwd)
        self.processes.append(proc)
        return proc

    def restart(self, name: str, *, crash: bool = False, down_for: float = 0.0,
                timeout: float = 60.0) -> ManagedProcess:
        """Stop one component and start it again with the same command line, ports and data; return once
        it is ready again. For fault tests (an API server or etcd restart while a job trains).

        ``crash=True`` SIGKILLs it instead of the graceful SIGTERM; ``down_for`` keeps it down that many
        seconds. Only processes started by this handle (not one rebuilt by :meth:`load`) can be restarted.
        """
        index = next((i for i, p in enumerate(self.processes) if p.name == name), None)
        if index is None:
            raise ControlPlaneError(f"no process named {name!r}; have {sorted(self.pids)}")
        old = self.processes[index]
        if not old.argv:
            raise ControlPlaneError(f"{name} was not started by this handle; its command line is unknown")
        if crash:
            old.kill()
        else:
            old.stop()
        time.sleep(down_for)
        del self.processes[index]
        new = self._spawn(name, old.argv, env=old.env, cwd=old.cwd)
        self.processes.remove(new)
        self.processes.insert(index, new)
        self.write_state()
        self._wait(f"{name} to be ready again", new, self._ready_probe(name), timeout)
        return new

    def _ready_probe(self, name: str) -> Callable[[], bool]:
        """The readiness check of one component, as used at start and after :meth:`restart`."""
        if name == "etcd":
            def etcd() -> bool:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['etcd']}/health", timeout=2) as resp:
                    return json.loads(resp.read()).get("health") == "true"
            return etcd
        if name == "kube-apiserver":
            def apiserver() -> bool:
                return self.api("GET", "/readyz", timeout=3) == (200, "ok")
            return apiserver
        if name == "kube-controller-manager":
            def kcm() -> bool:
                # Its serving certificate is self-signed (--cert-dir); only liveness is asked here.
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                with urllib.request.urlopen(f"https://127.0.0.1:{self.ports['kcm']}/healthz", context=ctx,
                                            timeout=3) as resp:
                    return resp.status == 200
            return kcm
        return lambda: True

    def _wait(self, what: str, proc: ManagedProcess, probe: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise ControlPlaneError(f"{proc.name} exited while waiting for {what}; see {proc.log}:\n"
                                        f"{_tail(proc.log)}")
            with contextlib.suppress(OSError, ValueError):
                if probe():
                    return
            time.sleep(0.2)
        raise ControlPlaneError(f"timed out after {timeout:.0f}s waiting for {what}; see {proc.log}:\n"
                                f"{_tail(proc.log)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_control_plane(workdir: Path, *, bin_dir: Path | None = None, node_agent: bool = False,
                        die_with_parent: bool = False, timeout: float = 120.0) -> ControlPlane:
    """Start etcd, kube-apiserver and kube-controller-manager under ``workdir``; return once usable.

    ``workdir`` receives pki/, etcd/, logs/, kubeconfig and pids.json. On any failure every process
    already started is stopped before the error propagates, so a failed start leaks nothing.
    ``die_with_parent=True`` (the test fixture) makes the kernel kill each process if this Python process
    dies; ``make cluster-up`` leaves it False because its processes must outlive the command.
    Ports are picked free just before use; if another process takes one first (the component logs
    "address already in use") the start is retried with fresh ports, up to three times.
    """
    workdir = Path(workdir).resolve()
    bin_dir = bin_dir or ensure_binaries()
    for attempt in range(3):
        if attempt:
            for stale in ("etcd", "pki", "logs"):
                shutil.rmtree(workdir / stale, ignore_errors=True)
        try:
            return _start_once(workdir, bin_dir, node_agent=node_agent, die_with_parent=die_with_parent,
                               timeout=timeout)
        except ControlPlaneError as err:
            if "address already in use" not in str(err) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _start_once(workdir: Path, bin_dir: Path, *, node_agent: bool, die_with_parent: bool,
                timeout: float) -> ControlPlane:
    workdir.mkdir(parents=True, exist_ok=True)
    pki = workdir / "pki"
    generate_pki(pki)
    ports = {"etcd": free_port(), "etcd-peer": free_port(), "apiserver": free_port(), "kcm": free_port()}
    server = f"https://127.0.0.1:{ports['apiserver']}"
    admin_token, kcm_token = secrets.token_hex(24), secrets.token_hex(24)
    (pki / "tokens.csv").write_text(
        f'{admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n'
        f"{kcm_token},{KCM_USER},{KCM_USER}\n"
    )
    ca_pem = (pki / "ca.crt").read_bytes()
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(render_kubeconfig(server, ca_pem, ADMIN_USER, admin_token))
    kcm_kubeconfig = pki / "kcm.kubeconfig"
    kcm_kubeconfig.write_text(render_kubeconfig(server, ca_pem, KCM_USER, kcm_token))
    for path in (pki / "tokens.csv", kubeconfig, kcm_kubeconfig, *pki.glob("*.key")):
        path.chmod(0o600)
    cp = ControlPlane(workdir=workdir, server=server, ca_path=pki / "ca.crt", token=admin_token,
                      kubeconfig=kubeconfig, ports=ports, die_with_parent=die_with_parent)
    try:
        _start_etcd(cp, bin_dir, timeout)
        _start_apiserver(cp, bin_dir, timeout)
        _start_kcm(cp, bin_dir, kcm_kubeconfig, timeout)
        cp.write_state()
        if node_agent:
            cp.start_node_agent()
    except BaseException:
        cp.stop()
        raise
    return cp


def _start_etcd(cp: ControlPlane, bin_dir: Path, timeout: float) -> None:
    client = f"http://127.0.0.1:{cp.ports['etcd']}"
    peer = f"http://127.0.0.1:{cp.ports['etcd-peer']}"
    proc = cp._spawn("etcd", [
        str(bin_dir / "etcd"), "--name=devcluster", f"--data-dir={cp.workdir / 'etcd'}",
        f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=devcluster={peer}", "--initial-cluster-state=new",
        # Tests tolerate losing etcd's last writes on a machine crash; fsync on every write would not pay.
        "--unsafe-no-fsync=true", "--log-level=warn",
    ])
    cp.write_state()
    cp._wait("etcd /health", proc, cp._ready_probe("etcd"), timeout)


def _start_apiserver(cp: ControlPlane, bin_dir: Path, timeout: float) -> None:
    pki = cp.workdir / "pki"
    proc = cp._spawn("kube-apiserver", [
        str(bin_dir / "kube-apiserver"),
        f"--etcd-servers=http://127.0.0.1:{cp.ports['etcd']}",
        "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={cp.ports['apiserver']}",
        f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}", f"--token-auth-file={pki / 'tokens.csv'}",
        f"--service-account-issuer={SA_ISSUER}", f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
        f"--requestheader-allowed-names={FRONT_PROXY_CN}", "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group", "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
        f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
        # Reach a node at its InternalIP (127.0.0.1): its name resolves nowhere, and DNS must stay local.
        "--kubelet-preferred-address-types=InternalIP",
        f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
        f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
        "--authorization-mode=Node,RBAC", f"--enable-admission-plugins={','.join(ADMISSION_PLUGINS)}",
        "--allow-privileged=true", "--profiling=false", f"--cert-dir={pki}",
        "--endpoint-reconciler-type=none", "--v=1",
    ])
    cp.write_state()
    cp._wait("kube-apiserver /readyz", proc, cp._ready_probe("kube-apiserver"), timeout)


def _start_kcm(cp: ControlPlane, bin_dir: Path, kcm_kubeconfig: Path, timeout: float) -> None:
    pki = cp.workdir / "pki"
    proc = cp._spawn("kube-controller-manager", [
        str(bin_dir / "kube-controller-manager"),
        f"--kubeconfig={kcm_kubeconfig}", f"--authentication-kubeconfig={kcm_kubeconfig}",
        f"--authorization-kubeconfig={kcm_kubeconfig}",
        "--bind-address=127.0.0.1", f"--secure-port={cp.ports['kcm']}", f"--cert-dir={pki / 'kcm'}",
        f"--controllers={','.join(KCM_CONTROLLERS)}", "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}", "--leader-elect=false",
        # Quick GC and namespace teardown: tests wait on both.
        "--concurrent-gc-syncs=10", "--namespace-sync-period=10s", "--v=1",
    ])
    cp.write_state()

    def default_sa() -> bool:
        status, _ = cp.api("GET", "/api/v1/namespaces/default/serviceaccounts/default", timeout=3)
        return status == 200

    cp._wait("the controller manager to create the default ServiceAccount", proc, default_sa, timeout)
