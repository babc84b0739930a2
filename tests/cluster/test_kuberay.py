"""Rendered KubeRay manifests validate against KubeRay's published CRD schemas (as an API server would)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.kuberay import render_raycluster, render_rayjob, render_rayservice, worker_pods
from cluster.submit import compose_profile, main
from tests.cluster.crds import assert_valid

PROFILES = ["a100", "h100", "mi250", "mi300x"]


@pytest.mark.parametrize("profile", PROFILES)
def test_manifests_validate_for_every_gpu_profile(profile: str) -> None:
    cluster = compose_profile(profile, []).cluster
    assert_valid(render_raycluster(cluster, f"moe-{profile}"))
    assert_valid(render_rayjob(cluster, f"moe-{profile}-job", ["model=deepseek_moe_16b", "train.steps=1000"]))
    assert_valid(render_rayservice(cluster, f"moe-{profile}-serve"))


def test_gpu_resource_and_pod_count_follow_the_vendor() -> None:
    nvidia = compose_profile("h100", ["cluster.num_workers=16"]).cluster
    amd = compose_profile("mi300x", []).cluster
    assert worker_pods(nvidia) == (2, 8)
    limits = render_raycluster(nvidia, "x")["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "8"
    job = render_rayjob(amd, "x", ["train.steps=5"])
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["amd.com/gpu"] == "8"
    assert {"name": "HSA_FORCE_FINE_GRAIN_PCIE", "value": "1"} in worker["env"]
    assert job["spec"]["entrypoint"] == "python -m pipelines.train +cluster=mi300x train.steps=5"


def test_elastic_profile_enables_autoscaling_between_min_and_max() -> None:
    cluster = compose_profile("a100", ["cluster.num_workers=32", "cluster.min_workers=16"]).cluster
    spec = render_raycluster(cluster, "x")["spec"]
    group = spec["workerGroupSpecs"][0]
    assert spec["enableInTreeAutoscaling"] is True
    assert (group["minReplicas"], group["maxReplicas"]) == (2, 4)


def test_submit_dry_run_prints_a_valid_manifest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["+cluster=h100", "target=service", "dry_run=true"]) == 0
    assert_valid(yaml.safe_load(capsys.readouterr().out))


def test_submit_without_credentials_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(SystemExit, match="no Kubernetes credentials.*KUBECONFIG"):
        main(["+cluster=a100", "target=train"])
