"""gen-gomod.py derives the staging-module replace list from k8s.io/kubernetes's own go.mod, and the
committed go.mod is exactly what it generates for the pinned release (no hand edits, no drift)."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path
from types import ModuleType

import pytest

SRC = Path(__file__).resolve().parents[4] / "hack" / "controlplane"

SAMPLE = """module k8s.io/kubernetes

go 1.26.0

godebug default=go1.26

require (
\tk8s.io/api v0.0.0
\tk8s.io/client-go v0.0.0
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
)
"""


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_gomod", SRC / "gen-gomod.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _replaces(text: str) -> list[str]:
    block = re.search(r"^replace \((.*?)^\)", text, re.M | re.S)
    assert block is not None
    return sorted(line.strip() for line in block.group(1).splitlines() if line.strip())


def test_staging_tag_maps_the_release_to_v0(gen: ModuleType) -> None:
    assert gen.staging_tag("v1.37.2") == "v0.37.2"
    with pytest.raises(SystemExit, match="--k8s"):
        gen.staging_tag("1.37.2")


def test_render_replaces_every_staging_module_with_its_tag(gen: ModuleType) -> None:
    text = gen.render("v1.37.2", SAMPLE)
    assert "require k8s.io/kubernetes v1.37.2" in text
    assert "godebug default=go1.26" in text
    assert "go 1.26.0" in text
    assert _replaces(text) == ["k8s.io/api => k8s.io/api v0.37.2", "k8s.io/client-go => k8s.io/client-go v0.37.2"]


def test_a_go_mod_without_staging_replaces_is_refused(gen: ModuleType) -> None:
    with pytest.raises(SystemExit, match="replace"):
        gen.staging_modules("module k8s.io/kubernetes\n\ngo 1.26\n")


def test_committed_go_mod_matches_the_generator(gen: ModuleType) -> None:
    if shutil.which("go") is None:
        pytest.fail("the Go toolchain is required (make test builds the control plane with it)")
    version = (SRC / "VERSION").read_text().strip()
    expected = gen.render(version, gen.kubernetes_gomod(version))
    committed = (SRC / "go.mod").read_text()
    assert committed.splitlines()[0] == expected.splitlines()[0]
    assert f"k8s.io/kubernetes {version}" in committed
    assert _replaces(committed) == _replaces(expected)
    assert len(_replaces(committed)) > 20
