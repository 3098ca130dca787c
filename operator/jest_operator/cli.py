"""``jestctl``: run, render and validate ``JESTTrainingJob`` manifests without a cluster.

The commands are thin edges over the operator's own pure parts: ``parse_job`` validates a manifest
exactly as the operator would, ``build_children`` produces the ConfigMap/Service/Pods the operator
would create, and ``jest_operator.local`` runs those pods as a local gang with the operator's restart
semantics. Nothing here imports torch at start-up; the trainer is loaded lazily by ``data`` and
``bench`` only, so ``jestctl validate`` stays fast and works in the operator image.

Exit codes: 0 success, 1 the job failed, 2 bad input (manifest, flags), 128+signal when a run was
interrupted (the workers checkpointed first and the next ``run`` resumes).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_WORKDIR_ROOT = Path(".jest")


class ManifestError(Exception):
    """A manifest or flag problem reported to the user as one line (field named where there is one)."""


def load_job_documents(path: Path) -> list[dict[str, Any]]:
    """Every ``JESTTrainingJob`` document of a (multi-document) YAML file, numbers read as kubectl reads them."""
    from jest_operator.api import load_manifests as manifest_loader

    try:
        text = path.read_text()
    except OSError as error:
        raise ManifestError(f"{path}: cannot read: {error.strerror or error}") from error
    try:
        documents = manifest_loader(text)
    except yaml.YAMLError as error:
        raise ManifestError(f"{path}: not valid YAML: {error}") from error
    jobs = []
    for position, document in enumerate(documents):
        if not isinstance(document, dict):
            raise ManifestError(f"{path}: document {position + 1} is not a mapping")
        if document.get("kind") == "JESTTrainingJob":
            jobs.append(document)
    if not jobs:
        raise ManifestError(f"{path}: no JESTTrainingJob document (kind: JESTTrainingJob)")
    return jobs


def invalid_spec_text(error: Exception) -> str:
    """``<field>: <message>`` for an ``InvalidSpec`` (or any validation error, as best it names it)."""
    field = getattr(error, "field", None)
    message = getattr(error, "message", None)
    if field and message:
        return f"{field}: {message}"
    return str(error)


def parse_manifest(document: dict[str, Any], overrides: Sequence[str] = ()) -> Any:
    """Apply ``--set`` overrides (keys relative to the manifest) and parse with the operator's ``parse_job``.

    Raises ``ManifestError`` naming the field, so nothing starts on a bad manifest.
    """
    from jest_trainer.config import apply_overrides

    from jest_operator.api import parse_job

    try:
        document = apply_overrides(document, list(overrides))
    except ValueError as error:
        raise ManifestError(str(error)) from error
    name = (document.get("metadata") or {}).get("name", "<unnamed>")
    try:
        return parse_job(document)
    except ValueError as error:
        raise ManifestError(f"invalid JESTTrainingJob {name!r}: {invalid_spec_text(error)}") from error


def load_one_job(path: Path, overrides: Sequence[str] = ()) -> Any:
    """The single JESTTrainingJob of ``path`` after overrides, validated."""
    documents = load_job_documents(path)
    if len(documents) != 1:
        raise ManifestError(f"{path}: contains {len(documents)} JESTTrainingJobs; this command takes one")
    return parse_manifest(documents[0], overrides)


# ----------------------------------------------------------------------------------------------- summary


def build_summary(result: Any, *, world_size: int, message: str | None = None) -> dict[str, Any]:
    """The ``--json`` summary of a local run (pure: from a ``GangResult`` and the job's world size).

    Counters come from rank 0's last progress file; fields the trainer never reported are null.
    ``restart_to_resume_seconds`` (beyond the documented keys) lists, per gang restart, the seconds from
    detecting the failure to the restarted trainer's first progress report (resumed from its checkpoint).
    """
    progress = result.progress or {}
    energy = progress.get("energy") or {}
    return {
        "phase": result.phase,
        "world_size": world_size,
        "steps": progress.get("step"),
        "restarts": result.restarts,
        "resumed_from_step": progress.get("resumedFromStep"),
        "final_accuracy": progress.get("lastEvalAccuracy"),
        "examples_trained": progress.get("examplesTrained"),
        "examples_scored": progress.get("examplesScored"),
        "energy": {
            "joules": energy.get("joules"),
            "method": energy.get("method"),
            "source": energy.get("source"),
        },
        "examples_per_second": progress.get("examplesPerSecond"),
        "retrieval": progress.get("lastEvalRetrieval"),
        "samples_skipped": progress.get("samplesSkipped"),
        "reference_mode": progress.get("referenceMode"),
        "data_wait_fraction": progress.get("dataWaitFraction"),
        "configuration": progress.get("configuration"),
        "wall_seconds": round(result.wall_seconds, 3),
        "restart_to_resume_seconds": [round(seconds, 3) for seconds in getattr(result, "resume_seconds", [])],
        "message": message if message is not None else result.message,
    }


def failed_summary(message: str) -> dict[str, Any]:
    """The ``--json`` summary of a run that never started (bad manifest): phase Failed, counters null."""
    return {
        "phase": "Failed", "world_size": None, "steps": None, "restarts": 0, "resumed_from_step": None,
        "final_accuracy": None, "examples_trained": None, "examples_scored": None,
        "energy": {"joules": None, "method": None, "source": None}, "examples_per_second": None,
        "retrieval": None, "samples_skipped": None, "reference_mode": None, "data_wait_fraction": None,
        "configuration": None, "wall_seconds": 0.0, "restart_to_resume_seconds": [], "message": message,
    }


def energy_text(energy: dict[str, Any]) -> str:
    """Energy with its provenance, e.g. ``12.3 kJ (modelled: config:modelledWattsPerDevice; not measured)``."""
    joules = energy.get("joules")
    if joules is None:
        return "not reported"
    method = energy.get("method") or "unknown method"
    source = energy.get("source") or "unknown source"
    label = f"{method}: {source}"
    if method == "modelled":
        label += "; not measured"
    amount = f"{joules / 1000:.2f} kJ" if joules >= 1000 else f"{joules:.1f} J"
    return f"{amount} ({label})"


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The human summary table rows (label, value)."""

    def number(value: Any, pattern: str) -> str:
        return "—" if value is None else pattern.format(value)

    return [
        ("phase", str(summary["phase"])),
        ("world size", number(summary["world_size"], "{}")),
        ("steps", number(summary["steps"], "{}")),
        ("gang restarts", str(summary["restarts"])),
        ("resumed from step", number(summary["resumed_from_step"], "{}")),
        ("final accuracy (zero-shot)", number(summary["final_accuracy"], "{:.1%}")),
        ("examples trained", number(summary["examples_trained"], "{:,}")),
        ("examples scored", number(summary["examples_scored"], "{:,}")),
        ("throughput", number(summary["examples_per_second"], "{:,.1f} examples/s trained")),
        ("energy", energy_text(summary["energy"])),
        ("wall time", f"{summary['wall_seconds']:.1f} s"),
    ]


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` as indented JSON, creating parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------- run


class ProgressView:
    """One job-level rich progress bar fed from rank 0's progress file; worker logs print above it."""

    def __init__(self, job_name: str, total_steps: int, *, enabled: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True, highlight=False)
        self.job_name = job_name
        self.enabled = enabled
        self._lock = threading.Lock()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[details]}"), TimeElapsedColumn(),
            console=self.console, transient=False, disable=not enabled,
        )
        self._task = self._progress.add_task(f"{job_name} attempt 0", total=total_steps, details="starting")

    def __enter__(self) -> ProgressView:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def log(self, line: str) -> None:
        """Print one worker/jestctl log line above the bar (thread-safe)."""
        with self._lock:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def update(self, progress: dict[str, Any] | None, attempt: int) -> None:
        """Move the bar to the trainer's step and show loss, accuracy, throughput and energy."""
        fields: dict[str, Any] = {"description": f"{self.job_name} attempt {attempt}"}
        if progress is not None:
            details = []
            if progress.get("loss") is not None:
                details.append(f"loss {progress['loss']:.3f}")
            if progress.get("lastEvalAccuracy") is not None:
                details.append(f"acc {progress['lastEvalAccuracy']:.1%}")
            if progress.get("examplesPerSecond") is not None:
                details.append(f"{progress['examplesPerSecond']:.0f} ex/s")
            energy = progress.get("energy") or {}
            if energy.get("joules") is not None:
                details.append(f"{energy['joules'] / 1000:.2f} kJ {energy.get('method', '')}".rstrip())
            fields["details"] = "  ".join(details)
            if progress.get("step") is not None:
                fields["completed"] = progress["step"]
            if progress.get("totalSteps"):
                fields["total"] = progress["totalSteps"]
        self._progress.update(self._task, **fields)


@contextmanager
def forwarding_signals(stop: threading.Event, received: list[int], log: Any) -> Iterator[None]:
    """While active, SIGINT/SIGTERM to jestctl only set ``stop`` (the runner forwards SIGTERM to workers)."""

    def handler(signum: int, _frame: Any) -> None:
        received.append(signum)
        if not stop.is_set():
            log(f"[jestctl] {signal.Signals(signum).name}: forwarding SIGTERM to every worker (they checkpoint)")
        stop.set()

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def print_summary(summary: dict[str, Any]) -> None:
    """The human summary table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="jestctl run summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for label, value in summary_rows(summary):
        table.add_row(label, value)
    console = Console(highlight=False)
    console.print(table)
    if summary["phase"] != "Succeeded" and summary["message"]:
        console.print(summary["message"], markup=False)


def parse_env_flags(items: Sequence[str]) -> dict[str, str]:
    """``--env NAME=VALUE`` flags as a dict; a clear error for a malformed one."""
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not name.replace("_", "a").isalnum() or name[0].isdigit():
            raise ManifestError(f"--env expects NAME=VALUE, got {item!r}")
        env[name] = value
    return env


def command_run(args: argparse.Namespace) -> int:
    """``jestctl run``: validate, then run the job's pods as a local gang with operator semantics."""
    from jest_operator.api import world_size
    from jest_operator.builders import build_children
    from jest_operator.local import GangRunner, LocalizeError

    try:
        job = load_one_job(Path(args.manifest), args.set or [])
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        if args.json:
            write_json(Path(args.json), failed_summary(str(error)))
        return EXIT_USAGE

    try:
        extra_env = parse_env_flags(args.env or [])
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    name = job.metadata.name
    workdir = Path(args.workdir) if args.workdir else DEFAULT_WORKDIR_ROOT / name
    run_policy = job.spec.run_policy
    view = ProgressView(name, job.spec.training.steps, enabled=not args.no_progress)
    runner = GangRunner(
        job=job,
        build_children=build_children,
        workdir=workdir.resolve(),
        backoff_limit=run_policy.backoff_limit,
        metrics_port=args.metrics_port,
        procs_per_pod=job.spec.num_proc_per_node,
        sink=view.log,
        on_progress=view.update,
        active_deadline_seconds=run_policy.active_deadline_seconds,
        budget_joules=job.spec.energy.budget_joules,
        on_budget_exceeded=job.spec.energy.on_budget_exceeded,
        grace_seconds=args.grace_seconds,
        extra_env={"JEST_PROGRESS": "plain", **extra_env},
    )
    if run_policy.suspend:
        print(f"error: {name}: spec.runPolicy.suspend is true; nothing to run", file=sys.stderr)
        return EXIT_USAGE
    try:
        with forwarding_signals(runner.stop, runner.stop_signal, view.log), view:
            result = runner.run()
    except LocalizeError as error:
        print(f"error: {name}: cannot run the pod locally: {error}", file=sys.stderr)
        if args.json:
            write_json(Path(args.json), failed_summary(str(error)))
        return EXIT_USAGE

    summary = build_summary(result, world_size=world_size(job))
    if args.json:
        write_json(Path(args.json), summary)
    print_summary(summary)
    if result.phase == "Succeeded":
        return EXIT_OK
    if result.phase == "Suspended" and result.interrupted_by is not None:
        # SIGTERM is how schedulers and `kill` ask for a graceful stop: every worker checkpointed, so it is a
        # clean exit, like the trainer's own. Ctrl-C keeps the shell convention (130) for interactive use.
        return EXIT_OK if result.interrupted_by == signal.SIGTERM else 128 + result.interrupted_by
    return EXIT_FAILED


# --------------------------------------------------------------------------------- render, validate, crds


def command_render(args: argparse.Namespace) -> int:
    """``jestctl render``: the children the operator would create, as multi-document YAML."""
    from jest_operator.builders import build_children

    try:
        job = load_one_job(Path(args.manifest), args.set or [])
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    children = build_children(job, attempt=args.attempt)
    sys.stdout.write(yaml.safe_dump_all(children, sort_keys=False, default_flow_style=False))
    return EXIT_OK


def command_validate(args: argparse.Namespace) -> int:
    """``jestctl validate``: every JESTTrainingJob in every file; non-zero with the field named on error.

    Beyond the schema, each job meets the spec checks of the chart's admission policy
    (:mod:`jest_operator.admission`): the chart's defaults, or the ``admissionPolicy`` block of the Helm
    values file ``--admission-values`` (what the cluster's admin installed with).
    """
    from jest_operator.admission import AdmissionPolicy, refusals
    from jest_operator.api import world_size

    try:
        values = yaml.safe_load(Path(args.admission_values).read_text()) if args.admission_values else {}
        policy = AdmissionPolicy.from_values(values if isinstance(values, dict) else {})
    except (OSError, yaml.YAMLError, ValueError) as error:
        print(f"error: --admission-values {args.admission_values}: {error}", file=sys.stderr)
        return EXIT_USAGE
    invalid = 0
    for manifest in args.manifests:
        try:
            documents = load_job_documents(Path(manifest))
        except ManifestError as error:
            print(f"{error}", file=sys.stderr)
            invalid += 1
            continue
        for document in documents:
            try:
                job = parse_manifest(document, args.set or [])
            except ManifestError as error:
                print(f"{manifest}: {error}", file=sys.stderr)
                invalid += 1
                continue
            refused = refusals(job, policy)
            for message in refused:
                print(f"{manifest}: JESTTrainingJob {job.metadata.name!r} would be refused by the admission policy: "
                      f"{message}", file=sys.stderr)
            if refused:
                invalid += 1
                continue
            print(f"{manifest}: JESTTrainingJob {job.metadata.name!r} is valid (world size {world_size(job)})")
    return EXIT_FAILED if invalid else EXIT_OK


def command_crds(args: argparse.Namespace) -> int:
    """``jestctl crds``: regenerate the CRD YAML from the API models (``jest_operator.crd``).

    One file only: the Helm chart reads the committed ``crds/`` copy through a link (see ``crd.CRD_PATH``).
    """
    from jest_operator.crd import CRD_FILE_NAME, write_crds

    path = Path(args.out) / CRD_FILE_NAME
    write_crds([path])
    print(f"wrote {path}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------- data, bench


def command_data_digits(args: argparse.Namespace) -> int:
    """``jestctl data digits``: write the digits demo as WebDataset shards (loads the trainer lazily).

    Prints the shard pattern of each split, ready for ``spec.training.data.urls`` / ``evalUrls``.
    """
    from jest_trainer.config import NoiseConfig
    from jest_trainer.data import shard_pattern, write_digits_webdataset

    try:
        noise = NoiseConfig(wrong=args.wrong, junk=args.junk, duplicate=args.duplicate)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    written = write_digits_webdataset(Path(args.out), noise=noise, seed=args.seed, shard_size=args.shard_size)
    for split, paths in written.items():
        print(f"{split}: {shard_pattern(paths)}")
    return EXIT_OK


def command_score(args: argparse.Namespace) -> int:
    """``jestctl score``: precompute reference embeddings as sidecar shards (loads the trainer lazily)."""
    try:
        job = load_one_job(Path(args.manifest), args.set or [])
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    from jest_trainer.score import score_shards

    try:
        manifest = score_shards(job.spec.training, Path(args.out), batch_size=args.batch_size)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {manifest['samples']:,} reference embeddings in {manifest['shards']} sidecar shard(s) to {args.out}")
    settings = manifest["settings"].items()
    print("train with: " + " ".join(f"--set spec.training.{key}={value}" for key, value in settings))
    return EXIT_OK


def command_bench_selection(args: argparse.Namespace) -> int:
    """``jestctl bench selection ...``: forwards its arguments to ``jest_trainer.benchmark``."""
    from jest_trainer.benchmark import main as benchmark_main

    return int(benchmark_main(["selection", *args.rest]) or 0)


def command_bench_scaling(args: argparse.Namespace) -> int:
    """``jestctl bench scaling ...``: the 1-vs-N worker scaling benchmark (``bench/scaling.py``)."""
    import runpy

    script = Path(__file__).resolve().parents[2] / "bench" / "scaling.py"
    if not script.is_file():
        print(f"error: {script} not found: bench scaling runs from a source checkout", file=sys.stderr)
        return EXIT_USAGE
    module = runpy.run_path(str(script), run_name="jest_bench_scaling")
    return int(module["main"](list(args.rest)) or 0)


# ------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The ``jestctl`` argument parser (one sub-command per verb)."""
    from jest_trainer.config import NoiseConfig

    parser = argparse.ArgumentParser(
        prog="jestctl",
        description="Run, render and validate JESTTrainingJob manifests without a cluster.",
        epilog="exit codes: 0 success (or stopped by SIGTERM after every worker checkpointed), 1 the job failed, "
               "2 bad manifest or flags, 130 interrupted by Ctrl-C after the workers checkpointed (the next run "
               "resumes)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a JESTTrainingJob locally as a gang of worker processes")
    run.add_argument("manifest", help="JESTTrainingJob YAML")
    run.add_argument("--workdir", help="checkpoints, config, progress and logs (default .jest/<name>)")
    run.add_argument("--json", help="write the run summary JSON here")
    run.add_argument("--metrics-port", type=int, default=None,
                     help="serve worker r's /metrics on PORT + r (default: no metrics server)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a manifest field, e.g. spec.training.steps=50 (repeatable)")
    run.add_argument("--env", action="append", metavar="NAME=VALUE",
                     help="extra environment of every local worker, e.g. JEST_DEBUG_DUMP_DIR=/tmp/dumps "
                          "(local debugging; not part of the manifest)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    run.add_argument("--grace-seconds", type=float, default=60.0,
                     help="how long workers may take to checkpoint after SIGTERM before SIGKILL")
    run.set_defaults(handler=command_run)

    render = commands.add_parser("render", help="print the ConfigMap, Service and Pods the operator creates")
    render.add_argument("manifest")
    render.add_argument("--set", action="append", metavar="KEY=VALUE")
    render.add_argument("--attempt", type=int, default=0, help="gang attempt to render (JEST_ATTEMPT)")
    render.set_defaults(handler=command_render)

    validate = commands.add_parser("validate", help="validate manifests as the operator would")
    validate.add_argument("manifests", nargs="+")
    validate.add_argument("--set", action="append", metavar="KEY=VALUE")
    validate.add_argument("--admission-values", metavar="VALUES_YAML",
                          help="Helm values whose admissionPolicy block the cluster runs (default: the chart's)")
    validate.set_defaults(handler=command_validate)

    crds = commands.add_parser("crds", help="write the CRD YAML generated from the API models")
    crds.add_argument("--out", default="crds", help="directory of the CRD file (default crds/)")
    crds.set_defaults(handler=command_crds)

    data = commands.add_parser("data", help="prepare data sets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="SOURCE")
    digits = data_commands.add_parser("digits", help="the digits demo as WebDataset shards")
    digits.add_argument("--out", required=True, help="directory of the shards")
    digits.add_argument("--seed", type=int, default=0, help="split and noise seed")
    digits.add_argument("--shard-size", type=int, default=1000, help="examples per shard")
    for kind in ("wrong", "junk", "duplicate"):
        default = NoiseConfig.model_fields[kind].default
        digits.add_argument(f"--{kind}", type=float, default=default,
                            help=f"pool fraction of {kind} pairs (default {default})")
    digits.set_defaults(handler=command_data_digits)

    score = commands.add_parser("score", help="precompute reference embeddings of data.urls as sidecar shards")
    score.add_argument("manifest", help="JESTTrainingJob manifest (its training.data and training.reference)")
    score.add_argument("--out", required=True, help="directory of reference.pt and the sidecar shards")
    score.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec field")
    score.add_argument("--batch-size", type=int, default=256, help="samples per reference forward")
    score.set_defaults(handler=command_score)

    bench = commands.add_parser("bench", help="benchmarks (JSON + PNG)")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    selection = bench_commands.add_parser("selection", help="selection quality (jest_trainer.benchmark)",
                                          add_help=False)
    selection.add_argument("rest", nargs=argparse.REMAINDER)
    selection.set_defaults(handler=command_bench_selection)
    scaling = bench_commands.add_parser("scaling", help="examples/s with 1 vs N local workers", add_help=False)
    scaling.add_argument("rest", nargs=argparse.REMAINDER)
    scaling.set_defaults(handler=command_bench_scaling)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jestctl`` console script; returns the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    # Benchmarks own their flags (including --help): forward everything after the benchmark's name.
    forwarded = {"selection": command_bench_selection, "scaling": command_bench_scaling}
    if len(arguments) >= 2 and arguments[0] == "bench" and arguments[1] in forwarded:
        return int(forwarded[arguments[1]](argparse.Namespace(rest=arguments[2:])))
    args = build_parser().parse_args(arguments)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
