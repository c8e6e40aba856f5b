"""cluster.yaml passes Ray's own cluster-launcher validation; the KubeRay RayJob has the documented shape.

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
    """The distribution at this release, as cluster files pin it (hqsam-refine==0.1.0)."""
    return f"{project_field('name')}=={project_field('version')}"


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
    setup = " ".join(cluster["setup_commands"])
    assert f'"{pinned_project()}"' in setup and pinned_project().startswith("hqsam-refine==")


def test_kuberay_rayjob_has_the_documented_fields(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["entrypoint"].startswith("hqsam refine s3://")
    assert "--out s3://" in spec["entrypoint"] and "--device cuda" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert pinned_project() in runtime_env["pip"] and pinned_project().startswith("hqsam-refine==")

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
    assert set(images) == {f"rayproject/ray:{ray.__version__}-py311-gpu"}

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
