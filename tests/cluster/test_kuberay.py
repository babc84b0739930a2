"""Rendered KubeRay manifests validate against KubeRay's published CRD schemas (as an API server would)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from cluster.kuberay import (
    render_podmonitor,
    render_raycluster,
    render_rayjob,
    render_rayservice,
    worker_pods,
)
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
    # the manifest's replica range only (a training config with this range must also make up its global
    # batch at every size from 16 to 32: pipelines/train/layout.py, tested in tests/pipelines/test_elastic.py)
    cluster = dataclasses.replace(compose_profile("a100", ["cluster.num_workers=32"]).cluster, min_workers=16)
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


# The Prometheus operator's PodMonitor (monitoring.coreos.com/v1) as its CRD defines the fields rendered here (its
# schema is not in ../shared/): an API server prunes unknown fields silently, so a misspelt key would vanish.
PODMONITOR_SPEC = {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel", "podTargetLabels", "sampleLimit"}
PODMONITOR_ENDPOINT = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout", "honorLabels", "relabelings",
                       "metricRelabelings", "params"}
RELABEL_ACTIONS = {"replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep", "lowercase", "uppercase",
                   "keepequal", "dropequal"}
DURATION = re.compile(r"(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?")  # Prometheus's duration format
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def assert_valid_podmonitor(monitor: dict) -> None:
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    assert DNS_SUBDOMAIN.fullmatch(monitor["metadata"]["name"]) and monitor["metadata"]["namespace"]
    spec = monitor["spec"]
    assert set(spec) <= PODMONITOR_SPEC, set(spec) - PODMONITOR_SPEC
    assert spec["selector"]["matchLabels"]  # required; an empty selector would scrape every pod it may see
    assert spec["podMetricsEndpoints"]
    for endpoint in spec["podMetricsEndpoints"]:
        assert set(endpoint) <= PODMONITOR_ENDPOINT, set(endpoint) - PODMONITOR_ENDPOINT
        assert isinstance(endpoint["port"], str) and endpoint["path"].startswith("/")
        assert endpoint["interval"] and DURATION.fullmatch(endpoint["interval"])
        for rule in endpoint.get("relabelings", []):
            assert rule["action"] in RELABEL_ACTIONS
            assert all(LABEL_NAME.fullmatch(label) for label in rule["sourceLabels"])
            assert LABEL_NAME.fullmatch(rule["targetLabel"])


@pytest.mark.parametrize("profile", ["h100", "mi300x"])
def test_a_prometheus_operator_podmonitor_scrapes_the_head_and_every_worker(profile: str) -> None:
    cluster = compose_profile(profile, ["cluster.monitoring.prometheus_host=http://prometheus.monitoring.svc:9090"]).cluster
    monitor = render_podmonitor(cluster, f"moe-{profile}-metrics")
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert_valid_podmonitor(monitor)
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [cluster.namespace]}
    # (the same renderings validate against KubeRay's schemas in test_manifests_validate_for_every_gpu_profile)
    for manifest in (render_raycluster(cluster, "c"), render_rayjob(cluster, "j", []), render_rayservice(cluster, "s")):
        spec = manifest["spec"].get("rayClusterSpec") or manifest["spec"].get("rayClusterConfig") or manifest["spec"]
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            template = group["template"]
            labels = template["metadata"]["labels"]
            assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()  # the selector picks the pod
            ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
            assert ports[endpoint["port"]] == int(group["rayStartParams"]["metrics-export-port"]) == 8080
            assert template["metadata"]["annotations"]["prometheus.io/port"] == "8080"
        head_env = {e["name"]: e["value"] for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
        assert head_env["RAY_PROMETHEUS_HOST"] == "http://prometheus.monitoring.svc:9090"


def test_submit_dry_run_prints_the_podmonitor_after_the_manifest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["+cluster=a100", "target=cluster", "dry_run=true", "pod_monitor=true"]) == 0
    raycluster, monitor = yaml.safe_load_all(capsys.readouterr().out)
    assert_valid(raycluster)
    assert monitor["kind"] == "PodMonitor" and monitor["metadata"]["name"] == "elastic-moe-a100-cluster-metrics"
    assert_valid_podmonitor(monitor)
