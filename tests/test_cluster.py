"""cluster.yaml passes Ray's own cluster-launcher validation; the KubeRay RayJob has the documented shape;
both install hqsam's third-party dependencies (deploy/cluster-requirements.txt, pyproject's list pinned)
and never hqsam, whose code ships with each job (run for real in tests/test_shipped_code.py).

Offline: no cloud account, no Kubernetes.
"""

from __future__ import annotations

import re

import pytest
import yaml

from tests.conftest import ROOT

ray = pytest.importorskip("ray")


def project_field(name: str) -> str:
    return re.search(rf'^{name} = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def pinned_project() -> str:
    """The distribution at this release (hqsam-refine==0.1.0): no package index has it, so no
    cluster file may install it."""
    return f"{project_field('name')}=={project_field('version')}"


def requirements() -> list[str]:
    lines = (ROOT / "deploy" / "cluster-requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_cluster_requirements_are_pyprojects_dependencies_pinned():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    declared = {
        canonicalize_name(req.name): req
        for req in map(
            Requirement, tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        )
    }
    pinned = {canonicalize_name(req.name): req for req in map(Requirement, requirements())}
    assert set(pinned) == set(declared) and len(pinned) == len(requirements())
    assert "hqsam-refine" not in pinned
    for name, req in pinned.items():
        (spec,) = req.specifier  # exactly one exact pin per dependency
        assert spec.operator == "==", req
        assert declared[name].specifier.contains(spec.version), (
            f"{req} is outside pyproject's {declared[name]}"
        )
        assert req.extras == declared[name].extras, req
    assert str(pinned["ray"].specifier) == f"=={ray.__version__}"  # the Ray of the images


def test_dockerfile_builds_the_manifest_image_from_the_requirements():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    instructions = " ".join(line for line in text.splitlines() if not line.startswith("#")).replace("\\", " ")
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in text.splitlines()
    (copy,) = [line.split() for line in text.splitlines() if line.startswith("COPY ")]
    assert copy[1] == "deploy/cluster-requirements.txt" and (ROOT / copy[1]).is_file()
    assert f"pip install --no-cache-dir -r {copy[2]}" in instructions
    installed = instructions.split("pip install", 1)[1].split("&&")[0].split()
    assert [arg for arg in installed if not arg.startswith("-") and arg != copy[2]] == ['"boto3>=1.26"']


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "kuberay-refine-job.yaml").read_text())


def test_cluster_yaml_passes_ray_validation(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(cluster)
    validate_config(prepared)  # raises on a schema violation
    assert prepared["provider"]["type"] == "aws"
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_cluster_yaml_shape(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head schedules no heavy work
    workers = {name: spec for name, spec in types.items() if name != cluster["head_node_type"]}
    gpu = [
        spec
        for spec in workers.values()
        if spec["node_config"]["InstanceType"].startswith(("g5", "g6", "p4d", "p5"))
    ]
    cpu = [spec for spec in workers.values() if spec not in gpu]
    assert gpu and cpu
    for spec in workers.values():
        assert spec["min_workers"] == 0 and spec["max_workers"] >= 2
    assert cluster["idle_timeout_minutes"] > 0
    assert cluster["max_workers"] >= sum(spec["max_workers"] for spec in gpu)
    # The Ray image of the installed Ray, not the retired ray-ml images.
    assert cluster["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    # The nodes install the pinned third-party dependencies, mounted from this repository, never hqsam.
    (setup,) = cluster["setup_commands"]
    (mount,) = [
        remote
        for remote, local in cluster["file_mounts"].items()
        if local == "deploy/cluster-requirements.txt"
    ]
    assert setup == f"pip install --quiet -r {mount}" and (ROOT / cluster["file_mounts"][mount]).is_file()
    commands = " ".join(
        cluster["setup_commands"] + cluster["head_setup_commands"] + cluster["worker_setup_commands"]
    )
    assert pinned_project() not in commands and "hqsam" not in commands.replace(mount, "")


def test_kuberay_rayjob_has_the_documented_fields(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    # The CLI as a module of the shipped code: no `hqsam` script is installed on the nodes.
    assert spec["entrypoint"].startswith("python -m hqsam.jobs.cli refine s3://")
    assert "--out s3://" in spec["entrypoint"] and "--device cuda" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    (code,) = runtime_env["py_modules"]  # the zip of deploy/package_code.py
    assert code.startswith("s3://") and re.search(r"/hqsam-code-[0-9a-f]{12}\.zip$", code)
    assert "pip" not in runtime_env and pinned_project() not in spec["runtimeEnvYAML"]
    assert (ROOT / "deploy" / "package_code.py").is_file()

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    images = [c["image"] for c in head["template"]["spec"]["containers"]]
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    for group in groups.values():
        assert set(group) >= {
            "groupName",
            "replicas",
            "minReplicas",
            "maxReplicas",
            "rayStartParams",
            "template",
        }
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        images += [c["image"] for c in group["template"]["spec"]["containers"]]
    # One image everywhere: deploy/Dockerfile's, tagged with the Ray version it is built on.
    assert len(set(images)) == 1 and images[0].endswith(f"/hqsam-ray:{ray.__version__}-py311-gpu")

    gpu_groups = [
        group
        for group in groups.values()
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in group["template"]["spec"]["containers"])
    ]
    assert len(gpu_groups) == 1
    (gpu,) = gpu_groups
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 2
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    actors_max = int(spec["entrypoint"].split("--actors ")[1].split()[0].split(":")[-1])
    assert actors_max <= gpu["maxReplicas"]  # one refine actor per GPU
