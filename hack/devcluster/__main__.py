"""``python -m hack.devcluster up|down|status``: the user-facing dev cluster command behind make cluster-up.

``up`` starts the control plane (and the node agent when hack/devcluster/node_agent.py exists) as detached
processes, writes ``<dir>/kubeconfig`` and ``<dir>/pids.json`` and prints the ``export KUBECONFIG=...``
line. ``down`` stops exactly the processes recorded in pids.json (pid and start time must both match).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

from hack.devcluster.controlplane import ControlPlane, ControlPlaneError, start_control_plane


def _default_dir() -> Path:
    return Path(os.environ.get("JEST_CLUSTER_DIR", ".cluster"))


def cmd_up(workdir: Path, *, node_agent: bool) -> int:
    """Start the cluster unless one recorded in ``workdir`` still runs; print the export line."""
    if (workdir / "pids.json").exists():
        old = ControlPlane.load(workdir)
        if any(old.alive().values()):
            print(f"a cluster is already running from {workdir} (make cluster-down first)", file=sys.stderr)
            print(f"export KUBECONFIG={old.kubeconfig}")
            return 1
    if workdir.exists():
        shutil.rmtree(workdir)
    agent = node_agent and importlib.util.find_spec("hack.devcluster.node_agent") is not None
    t0 = time.monotonic()
    cp = start_control_plane(workdir, node_agent=agent)
    took = time.monotonic() - t0
    print(f"control plane ready in {took:.1f}s at {cp.server} (logs in {workdir.resolve() / 'logs'})",
          file=sys.stderr)
    for name, pid in cp.pids.items():
        print(f"  {name:24} pid {pid}", file=sys.stderr)
    if not agent:
        print("  (no node agent: pods will stay Pending)", file=sys.stderr)
    print(f"export KUBECONFIG={cp.kubeconfig}")
    return 0


def cmd_down(workdir: Path) -> int:
    """Stop what ``up`` recorded; a missing state file is not an error (nothing to stop)."""
    if not (workdir / "pids.json").exists():
        print(f"no cluster recorded in {workdir}", file=sys.stderr)
        return 0
    cp = ControlPlane.load(workdir)
    cp.stop()
    left = [name for name, alive in cp.alive().items() if alive]
    if left:
        print(f"still running: {', '.join(left)}", file=sys.stderr)
        return 1
    (workdir / "pids.json").unlink()
    print("cluster stopped", file=sys.stderr)
    return 0


def cmd_status(workdir: Path) -> int:
    """Print each recorded process and whether it runs; exit 0 only when all of them do."""
    cp = ControlPlane.load(workdir)
    alive = cp.alive()
    print(f"server {cp.server}\nkubeconfig {cp.kubeconfig}")
    for proc in cp.processes:
        print(f"  {proc.name:24} pid {proc.pid:<8} {'running' if alive[proc.name] else 'stopped'}")
    return 0 if alive and all(alive.values()) else 1


def main(argv: list[str] | None = None) -> int:
    """Parse the sub-command and run it; control-plane failures exit 2 with the step's log tail."""
    ap = argparse.ArgumentParser(prog="python -m hack.devcluster", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["up", "down", "status"])
    ap.add_argument("--dir", type=Path, default=_default_dir(), help="state directory (default .cluster)")
    ap.add_argument("--no-node-agent", action="store_true", help="start only the control plane")
    args = ap.parse_args(argv)
    workdir = args.dir.resolve()
    try:
        if args.command == "up":
            return cmd_up(workdir, node_agent=not args.no_node_agent)
        if args.command == "down":
            return cmd_down(workdir)
        return cmd_status(workdir)
    except ControlPlaneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
