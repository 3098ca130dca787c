"""The example manifests are valid everywhere; every bad manifest is refused by the CRD AND by parse_job.

"The CRD refuses it" is checked with ``crd.validate_custom_resource``: the committed CRD's schema with
jsonschema, strict unknown-field detection, API-server defaulting and the CEL rules evaluated by
cel-python. Each bad manifest declares in its header which field parse_job (``# field:``) and the
emulated API server (``# crd-field:``) must name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from jest_operator import builders
from jest_operator.api import InvalidSpec, parse_job, topology_chips, world_size
from jest_operator.crd import validate_custom_resource

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
BAD_MANIFESTS = sorted((REPO / "tests" / "fixtures" / "bad_manifests").glob("*.yaml"))
COMMITTED_CRD = yaml.safe_load((REPO / "crds" / "jesttrainingjobs.jest.training.yaml").read_text())


def load(path: Path) -> dict[str, Any]:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert len(documents) == 1, f"{path.name}: one manifest per file"
    return documents[0]


def header(path: Path, key: str) -> str:
    match = re.search(rf"^# {key}: (.+)$", path.read_text(), re.MULTILINE)
    assert match, f"{path.name} lacks a '# {key}:' header"
    return match.group(1).strip()


def test_the_three_examples_exist() -> None:
    assert {path.name for path in EXAMPLES} == {"quickstart.yaml", "gpu-siglip.yaml", "tpu.yaml"}
    assert len(BAD_MANIFESTS) >= 20


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid_for_crd_parser_and_kubernetes(path: Path) -> None:
    body = load(path)
    assert validate_custom_resource(body, COMMITTED_CRD) == []
    job = parse_job(body)
    for child in builders.build_children(job, attempt=0):
        kubernetes_validate.validate(child, "1.32.0", strict=True)


def test_quickstart_is_the_cpu_digits_demo() -> None:
    job = parse_job(load(REPO / "examples" / "quickstart.yaml"))
    spec = job.spec
    assert spec.num_nodes == 2 and spec.num_proc_per_node == 1 and spec.accelerator.type == "cpu"
    assert spec.training.data.source == "digits"
    selection = spec.training.selection
    assert (selection.method, selection.filter_ratio) == ("jest", 0.8)
    local_batch, local_super_batch = selection.per_rank(world_size(job))
    assert local_batch % selection.chunks == 0
    assert local_super_batch == round(local_batch / (1 - selection.filter_ratio))


def test_gpu_example_resumes_from_a_pvc_in_a_kueue_queue() -> None:
    job = parse_job(load(REPO / "examples" / "gpu-siglip.yaml"))
    assert (job.spec.num_nodes, job.spec.num_proc_per_node, job.spec.accelerator.count) == (4, 8, 8)
    assert job.spec.training.model.arch == "openclip:ViT-B-32"
    assert job.spec.training.data.source == "webdataset"
    assert builders.checkpoint_mount_covered(job)
    pod = builders.build_pod(job, 0, attempt=0)
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in pod["spec"]["containers"][0]["volumeMounts"]}
    assert "persistentVolumeClaim" in volumes[mounts["/checkpoints"]]
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert pod["spec"]["containers"][0]["command"][0] == "torchrun"


def test_tpu_example_fills_its_slice() -> None:
    job = parse_job(load(REPO / "examples" / "tpu.yaml"))
    tpu = job.spec.accelerator.tpu
    assert tpu is not None and (tpu.accelerator, tpu.topology) == ("tpu-v5-lite-podslice", "2x4")
    assert topology_chips(tpu.topology) == job.spec.num_nodes * job.spec.accelerator.count
    assert job.spec.energy.backend == "modelled"


@pytest.mark.parametrize("path", BAD_MANIFESTS, ids=lambda p: p.name)
def test_bad_manifest_is_refused_by_crd_and_parser(path: Path) -> None:
    body = load(path)
    violations = validate_custom_resource(body, COMMITTED_CRD)
    assert header(path, "crd-field") in {violation.field for violation in violations}, violations
    with pytest.raises(InvalidSpec) as info:
        parse_job(body)
    assert info.value.field == header(path, "field")
    assert str(info.value).startswith(f"{info.value.field}: ")
