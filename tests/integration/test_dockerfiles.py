"""The two Dockerfiles, checked statically (no Docker engine exists here, so nothing is built).

What can be known without building is checked against the repository itself: every path a COPY takes
from the build context exists and is not excluded by .dockerignore, the base image is pinned to an
exact release (or a digest), the final stage runs as a non-root user (uid 1000), the extras installed
exist in pyproject.toml (and the operator's pull in no torch), the entrypoints are console scripts the
package declares, no secret is baked in, and the operator's modules import without torch.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
IMAGES = {
    # Dockerfile -> (extra it must install, console script it must run)
    "operator/Dockerfile": ("operator", "jest-operator"),
    "trainer_image/Dockerfile": ("trainer", "jest-trainer"),
}
PINNED_PYTHON = re.compile(r"^python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?$|^python@sha256:[0-9a-f]{64}$")
SECRET_NAME = re.compile(r"(TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|API_?KEY|PRIVATE_?KEY)", re.IGNORECASE)


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: keyword (upper case), its raw arguments and the build stage index."""

    keyword: str
    arguments: str
    stage: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions in order, with line continuations joined and comments dropped (stage -1 = before FROM)."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are ignored by Docker too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    instructions: list[Instruction] = []
    stage = -1
    for text in logical:
        keyword, _, arguments = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, arguments.strip(), stage))
    return instructions


def build_arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    """ARG defaults declared before the first FROM (the only ones FROM lines may use)."""
    defaults = {}
    for instruction in instructions:
        if instruction.keyword == "ARG" and instruction.stage == -1:
            name, _, default = instruction.arguments.partition("=")
            defaults[name] = default.strip('"')
    return defaults


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), text)


def dockerignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.strip().startswith("#")]


def is_ignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `relative` (or a folder above it) out of the build context."""
    parts = Path(relative).parts
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        for depth in range(1, len(parts) + 1):
            candidate = "/".join(parts[:depth])
            bare = pattern[3:] if pattern.startswith("**/") else None
            if fnmatch.fnmatchcase(candidate, pattern) or (bare and fnmatch.fnmatchcase(parts[depth - 1], bare)):
                ignored = not negate
                break
    return ignored


def copy_sources(instruction: Instruction) -> list[str]:
    """The context paths a COPY/ADD reads (empty for COPY --from=<stage>, which reads another stage)."""
    tokens = instruction.arguments.split()
    if any(token.startswith("--from") for token in tokens):
        return []
    tokens = [token for token in tokens if not token.startswith("--")]
    if tokens and tokens[0].startswith("["):
        tokens = json.loads(instruction.arguments[instruction.arguments.index("[") :])
    return tokens[:-1]


def installed_extras(instructions: list[Instruction]) -> set[str]:
    extras: set[str] = set()
    for instruction in instructions:
        if instruction.keyword == "RUN" and "pip install" in instruction.arguments:
            for group in re.findall(r"\.\[([\w,-]+)\]", instruction.arguments):
                extras.update(group.split(","))
    return extras


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


@pytest.fixture(params=sorted(IMAGES))
def dockerfile(request: pytest.FixtureRequest) -> Path:
    return REPO_ROOT / request.param


def test_base_images_are_pinned(dockerfile: Path) -> None:
    instructions = parse_dockerfile(dockerfile)
    defaults = build_arg_defaults(instructions)
    stage_names: set[str] = set()
    for instruction in (i for i in instructions if i.keyword == "FROM"):
        image, *rest = instruction.arguments.split()
        if rest and rest[0].upper() == "AS":
            stage_names.add(rest[1])
        if image in stage_names:
            continue
        resolved = expand(image, defaults)
        assert PINNED_PYTHON.match(resolved), f"{dockerfile.name}: base {resolved!r} is not pinned to an exact release"


def test_every_copied_path_exists_in_the_build_context(dockerfile: Path) -> None:
    patterns = dockerignore_patterns()
    copies = [i for i in parse_dockerfile(dockerfile) if i.keyword in ("COPY", "ADD")]
    assert copies
    for instruction in copies:
        assert instruction.keyword == "COPY", "use COPY (ADD fetches URLs and unpacks archives implicitly)"
        for source in copy_sources(instruction):
            path = REPO_ROOT / source
            assert path.exists(), f"{dockerfile}: COPY source {source!r} does not exist"
            assert not is_ignored(source.rstrip("/"), patterns), f"{source!r} is excluded by .dockerignore"


def test_final_stage_runs_as_non_root(dockerfile: Path) -> None:
    instructions = parse_dockerfile(dockerfile)
    users = [i.arguments for i in final_stage(instructions) if i.keyword == "USER"]
    assert users, f"{dockerfile}: the final stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user == "1000", f"{dockerfile}: expected uid 1000, got {user!r}"
    runs = " ".join(i.arguments for i in final_stage(instructions) if i.keyword == "RUN")
    assert "--uid 1000" in runs, "the uid must exist in /etc/passwd (useradd --uid 1000)"


def test_installs_the_right_extras(dockerfile: Path) -> None:
    extra, _ = IMAGES[str(dockerfile.relative_to(REPO_ROOT))]
    extras = installed_extras(parse_dockerfile(dockerfile))
    declared = set(PYPROJECT["project"]["optional-dependencies"])
    assert extras == {extra}
    assert extras <= declared, f"{dockerfile}: extras {extras - declared} are not in pyproject.toml"


def test_trainer_image_builds_the_native_selection_kernel() -> None:
    """The kernel is an optional extension (installs without a compiler fall back to NumPy): the trainer image
    must give its build stage a compiler, copy setup.py, and fail the build if the kernel did not compile."""
    instructions = parse_dockerfile(REPO_ROOT / "trainer_image/Dockerfile")
    final_stage = max(instruction.stage for instruction in instructions)
    build = [instruction for instruction in instructions if instruction.stage < final_stage]
    runs = " ".join(instruction.arguments for instruction in build if instruction.keyword == "RUN")
    assert re.search(r"apt-get install[^&]*\bgcc\b", runs), "the build stage needs a C compiler"
    assert "import jest_trainer._selection_native" in runs
    copied = {path for instruction in build if instruction.keyword == "COPY" for path in copy_sources(instruction)}
    assert "setup.py" in copied


def test_operator_image_pulls_in_no_torch() -> None:
    requirements = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["operator"]
    names = {re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower() for requirement in requirements}
    assert not names & {"torch", "torchvision", "open-clip-torch", "torch-xla"}


def test_entrypoint_is_a_declared_console_script(dockerfile: Path) -> None:
    _, script = IMAGES[str(dockerfile.relative_to(REPO_ROOT))]
    entrypoints = [i.arguments for i in final_stage(parse_dockerfile(dockerfile)) if i.keyword == "ENTRYPOINT"]
    assert entrypoints, f"{dockerfile}: no ENTRYPOINT"
    assert json.loads(entrypoints[-1]) == [script]  # exec form: signals reach the process (SIGTERM checkpoint)
    assert script in PYPROJECT["project"]["scripts"]


def test_no_secrets_are_baked_in(dockerfile: Path) -> None:
    for instruction in parse_dockerfile(dockerfile):
        if instruction.keyword in ("ARG", "ENV"):
            names = re.findall(r"(?:^|\s)(\w+)=", instruction.arguments) or [instruction.arguments.split("=")[0]]
            assert not [n for n in names if SECRET_NAME.search(n)], f"{dockerfile}: {instruction}"
        if instruction.keyword == "COPY":
            for source in copy_sources(instruction):
                assert not re.search(r"(\.netrc|\.pem|\.key|id_rsa|\.env|\.docker/config)", source)


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = dockerignore_patterns()
    for local in (".git", ".venv", ".demo", "tests", "jest_operator.egg-info", "operator/jest_operator/__pycache__"):
        assert is_ignored(local, patterns), f"{local} would be sent to the Docker daemon"
    for needed in ("pyproject.toml", "README.md", "operator/jest_operator/api.py", "trainer_image/jest_trainer"):
        assert not is_ignored(needed, patterns), f"{needed} is needed by the images"


def test_dockerignore_matcher_follows_docker_semantics() -> None:
    """The small matcher above is what the COPY checks rely on; pin its behaviour."""
    patterns = ["**/__pycache__", "tests", "*.md", "!README.md"]
    assert is_ignored("a/b/__pycache__/x.pyc", patterns)
    assert is_ignored("tests/unit/test_x.py", patterns)
    assert is_ignored("NOTES.md", patterns)
    assert not is_ignored("README.md", patterns)
    assert not is_ignored("operator/tests_helper.py", patterns)


def test_operator_modules_import_without_torch() -> None:
    """The operator image has no torch: its entry point and every module it loads must import without it."""
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "import jest_operator.main, jest_operator.handlers, jest_operator.kube, jest_operator.api\n"
        "import jest_operator.builders, jest_operator.crd, jest_operator.status\n"
        "import kubernetes.client.rest  # the chart's peering init container needs only this\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
