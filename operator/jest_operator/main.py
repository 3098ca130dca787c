"""``jest-operator``: the operator's console entry, a thin wrapper of ``kopf run`` with our handlers.

    jest-operator [--namespace NS ...] [-A] [--liveness-port 8080] [--metrics-port 8000]
                  [--peering NAME [--priority N]] [--resync-seconds 5] [--verbose]

Without ``--namespace`` or ``-A`` it watches ``$WATCH_NAMESPACE`` (comma-separated) or, failing that,
every namespace. ``--liveness-port`` serves Kopf's ``/healthz`` (our resync probe included); the
Deployment's livenessProbe points there. ``--metrics-port`` serves the operator metrics
(``jest_operator_*``). Peering is off (``--standalone``) unless ``--peering`` names a KopfPeering object:
then several replicas can run and only the highest priority one acts (Kopf pauses the others' watches,
and the resync loop reads the same peering object to stay idle with them).
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (also used by the docs and tests)."""
    parser = argparse.ArgumentParser(prog="jest-operator", description="Kubernetes operator for JESTTrainingJobs.")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=None,
                       help="namespace to watch (repeatable; Kopf globs like 'team-*' work)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch the whole cluster")
    parser.add_argument("--liveness-port", type=int, default=None, help="serve /healthz on this port")
    parser.add_argument("--liveness-host", default="0.0.0.0", help="address of the liveness endpoint")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve operator /metrics on this port")
    parser.add_argument("--peering", default=None, help="KopfPeering name (enables peering; default standalone)")
    parser.add_argument("--priority", type=int, default=0, help="peering priority of this replica")
    parser.add_argument("--resync-seconds", type=float, default=None, help="level-based resync interval (5 s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, configure the handlers and run Kopf until SIGTERM/SIGINT."""
    args = build_parser().parse_args(argv)
    import kopf

    from jest_operator import handlers

    handlers.CONFIG.metrics_port = args.metrics_port
    if args.resync_seconds is not None:
        if args.resync_seconds <= 0:
            print("jest-operator: --resync-seconds must be > 0", file=sys.stderr)
            return 2
        handlers.CONFIG.resync_seconds = args.resync_seconds
    namespaces: list[str] = []
    if args.namespace:
        namespaces = args.namespace
    elif not args.all_namespaces and os.environ.get("WATCH_NAMESPACE"):
        namespaces = [ns.strip() for ns in os.environ["WATCH_NAMESPACE"].split(",") if ns.strip()]
    liveness = f"http://{args.liveness_host}:{args.liveness_port}/healthz" if args.liveness_port else None
    # One identity for Kopf's peering and for the resync loop, which idles while Kopf has paused us.
    # Kopf exports no public helper for it; this is the function kopf.run itself calls when given none.
    from kopf._core.engines import peering as kopf_peering

    identity = kopf_peering.detect_own_id(manual=False)
    handlers.CONFIG.peering_name = args.peering
    handlers.CONFIG.peering_priority = args.priority
    handlers.CONFIG.peering_identity = str(identity)
    handlers.CONFIG.clusterwide = not namespaces
    kopf.configure(verbose=args.verbose)
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=args.priority,
        liveness_endpoint=liveness,
        identity=identity,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
