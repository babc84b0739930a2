"""Rendered KubeRay manifests validate against KubeRay's published CRD schemas (as an API server would)."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cluster.kuberay import render_raycluster, render_rayjob, render_rayservice, worker_pods
from cluster.submit import compose_profile, main

# The KubeRay CRD schemas live in shared/ beside the checkout; KUBERAY_CRDS points elsewhere (a clone in /tmp).
CRDS = Path(os.environ.get("KUBERAY_CRDS") or Path(__file__).resolve().parents[2].parent / "shared" / "kuberay-crds")
PROFILES = ["a100", "h100", "mi250", "mi300x"]


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    doc = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
    version = next(v for v in doc["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the schema does not declare (the API server's strict field validation)."""
    out: list[str] = []
    if isinstance(obj, dict) and "properties" in schema:
        for key, value in obj.items():
            if key not in schema["properties"]:
                if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
                    out.append(f"{path}.{key}")
                continue
            out += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            out += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


def assert_valid(manifest: dict[str, Any]) -> None:
    if not CRDS.is_dir():
        pytest.fail(f"KubeRay CRD schemas not found at {CRDS}: they live in shared/ beside the checkout; "
                    "for a checkout elsewhere set KUBERAY_CRDS=<path to shared/kuberay-crds>.")
    schema = crd_schema(manifest["kind"])
    jsonschema.validate(manifest, schema)
    assert unknown_fields(manifest, schema) == []


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
    assert main(["service", "--profile", "h100", "--dry-run"]) == 0
    assert_valid(yaml.safe_load(capsys.readouterr().out))


def test_submit_without_credentials_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(SystemExit, match="no Kubernetes credentials.*KUBECONFIG"):
        main(["job", "--profile", "a100"])
