"""`python -m cluster.submit`: Hydra config, validation before any Kubernetes call, dry runs, create and delete."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import cluster.submit as submit
from cluster.submit import main
from moe.config import ConfigError
from pipelines.train.config import compose_train_config
from tests.cluster.crds import assert_valid

REPO = Path(__file__).resolve().parents[2]
TARGETS = {"train": "RayJob", "cluster": "RayCluster", "service": "RayService"}


@pytest.fixture
def no_kubernetes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach Kubernetes fails the test."""
    def refuse() -> Any:
        raise AssertionError("contacted Kubernetes")
    monkeypatch.setattr(submit, "_custom_objects_api", refuse)


def dry_run(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main([*args[:2], "dry_run=true", *args[2:]]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize(("target", "kind"), TARGETS.items())
@pytest.mark.parametrize("profile", ["h100", "mi300x"])
def test_dry_run_prints_a_valid_manifest_for_each_target(capsys, no_kubernetes, profile: str, target: str,
                                                         kind: str) -> None:
    manifest = dry_run(capsys, f"+cluster={profile}", f"target={target}")
    assert manifest["kind"] == kind
    assert manifest["metadata"]["name"] == f"elastic-moe-{profile}-{'job' if target == 'train' else target}"
    assert manifest["metadata"]["labels"]["elastic-moe/profile"] == profile
    assert_valid(manifest)


def test_train_overrides_reach_the_job_and_size_its_pods(capsys, no_kubernetes) -> None:
    job = dry_run(capsys, "+cluster=h100", "target=train", "name=moe-16b", "--", "model=deepseek_moe_16b",
                  "cluster.num_workers=16")
    assert job["metadata"]["name"] == "moe-16b"
    assert job["spec"]["entrypoint"] == ("python -m pipelines.train +cluster=h100 model=deepseek_moe_16b "
                                         "cluster.num_workers=16")
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2  # 16 workers, 8 GPUs per pod
    same = dry_run(capsys, "+cluster=h100", "target=train", "name=moe-16b",
                   'train_overrides=["model=deepseek_moe_16b","cluster.num_workers=16"]')
    assert same == job


def test_a_recipe_runs_as_a_job(capsys, no_kubernetes) -> None:
    job = dry_run(capsys, "+cluster=h100", "target=train", "--", "+experiment=deepseek16b_h100")
    assert job["spec"]["entrypoint"] == "python -m pipelines.train +cluster=h100 +experiment=deepseek16b_h100"
    assert_valid(job)


def test_bad_train_override_fails_with_the_train_config_error_first(capsys, no_kubernetes) -> None:
    with pytest.raises(ConfigError) as err:
        compose_train_config(["+cluster=a100", "model.moe.top_k=40"])
    assert main(["+cluster=a100", "target=train", "--", "model.moe.top_k=40"]) == 2
    out = capsys.readouterr()
    assert out.err == f"config error: {err.value}\n"
    assert out.err.startswith("config error: model.moe.top_k=40 > model.moe.n_routed_experts=16")
    assert out.out == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["+cluster=h100", "target=job"],
         "config error: target='job' is not a submit target; use one of: target=train (RayJob) | "
         "target=cluster (RayCluster) | target=service (RayService)."),
        (["target=cluster"], "config error: no cluster profile given; add +cluster=NAME"),
        (["+cluster=h100"], "config error: target is not set; add target=train|cluster|service"),
        (["+cluster=h100", "target=cluster", "name=My_Cluster"],
         "config error: name='My_Cluster' is not a valid Kubernetes object name"),
        (["+cluster=h100", "target=service", "--", "train.steps=5"],
         "config error: train_overrides=['train.steps=5'] only apply to target=train"),
        (["+cluster=h100", "target=train", "cluster.num_workers=16"],
         "config error: cluster.num_workers=16 set for the submission, but with target=train the job composes "
         "its own config; pass it to the job instead, after `--`"),
        (["+cluster=h100", "target=train", "--", "cluster=a100"],
         "config error: train_overrides select cluster profile 'a100' but the submission has +cluster=h100"),
        (["+cluster=h100", "target=train", "--", "model.n_expertz=4"],
         "config error: train_overrides=['model.n_expertz=4']: Could not override 'model.n_expertz'"),
        (["+cluster=h100", "target=train", "dry_run=maybe"], "config error: "),
    ],
)
def test_config_errors_name_the_key_and_fix_before_kubernetes(capsys, no_kubernetes, args: list[str],
                                                               message: str) -> None:
    assert main(args) == 2
    out = capsys.readouterr()
    assert out.err.startswith(message), out.err
    assert out.out == ""


def test_delete_without_credentials_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(SystemExit, match="no Kubernetes credentials.*KUBECONFIG.*dry_run=true"):
        main(["+cluster=mi300x", "target=cluster", "delete=true"])


class FakeApi:
    """Records CustomObjectsApi calls; `fail` makes them raise like the API server would."""

    def __init__(self, fail: int | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail = fail

    def _record(self, op: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        self.calls.append((op, kwargs))
        if self.fail:
            raise ApiException(status=self.fail, reason="Conflict" if self.fail == 409 else "Not Found")
        return kwargs.get("body") or {}

    def create_namespaced_custom_object(self, **kwargs: Any) -> dict[str, Any]:
        return self._record("create", kwargs)

    def delete_namespaced_custom_object(self, **kwargs: Any) -> dict[str, Any]:
        return self._record("delete", kwargs)


def test_create_and_delete_go_through_custom_objects_api(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeApi()
    monkeypatch.setattr(submit, "_custom_objects_api", lambda: api)
    assert main(["+cluster=a100", "target=service", "cluster.namespace=ml"]) == 0
    assert main(["+cluster=a100", "target=service", "cluster.namespace=ml", "delete=true"]) == 0
    assert capsys.readouterr().out == ("created RayService ml/elastic-moe-a100-service\n"
                                       "deleted RayService ml/elastic-moe-a100-service\n")
    (create, created), (delete, deleted) = api.calls
    assert (create, delete) == ("create", "delete")
    where = {"group": "ray.io", "version": "v1", "namespace": "ml", "plural": "rayservices"}
    assert {k: created[k] for k in where} == where and created["body"]["kind"] == "RayService"
    assert deleted == {**where, "name": "elastic-moe-a100-service"}


def test_dry_run_delete_contacts_nothing(capsys, no_kubernetes) -> None:
    assert main(["+cluster=h100", "target=train", "name=moe-run", "delete=true", "dry_run=true"]) == 0
    assert capsys.readouterr().out == "would delete RayJob default/moe-run\n"


@pytest.mark.parametrize(("status", "message"), [
    (409, "could not create RayCluster default/elastic-moe-h100-cluster: 409 Conflict; it already exists; "
          "delete it first (delete=true) or choose another name="),
    (404, "could not create RayCluster default/elastic-moe-h100-cluster: 404 Not Found; no such object, or the "
          "KubeRay CRDs (rayclusters.ray.io) are not installed"),
])
def test_api_errors_name_the_object_and_the_fix(monkeypatch: pytest.MonkeyPatch, status: int, message: str) -> None:
    monkeypatch.setattr(submit, "_custom_objects_api", lambda: FakeApi(fail=status))
    with pytest.raises(SystemExit) as exit_:
        main(["+cluster=h100", "target=cluster"])
    assert str(exit_.value.code).startswith(message)


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m cluster.submit ...` as users type it, from tmp_path (Hydra's run directory lands there)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "KUBECONFIG": str(tmp_path / "missing-kubeconfig")}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return subprocess.run([sys.executable, "-m", "cluster.submit", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_dry_run_and_config_error(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "+cluster=mi300x", "target=train", "dry_run=true", "--", "model=deepseek_moe_16b",
                   "train.steps=20000")
    assert proc.returncode == 0, proc.stderr
    job = yaml.safe_load(proc.stdout)
    assert job["spec"]["entrypoint"] == ("python -m pipelines.train +cluster=mi300x model=deepseek_moe_16b "
                                         "train.steps=20000")
    assert_valid(job)
    run_dirs = list((tmp_path / "outputs" / "hydra" / "submit").iterdir())
    assert len(run_dirs) == 1 and (run_dirs[0] / ".hydra" / "config.yaml").is_file()

    bad = run_cli(tmp_path, "+cluster=mi300x", "target=train", "--", "model.moe.top_k=40")
    assert bad.returncode == 2
    assert bad.stderr.startswith("config error: model.moe.top_k=40 > model.moe.n_routed_experts=16")
    assert "Kubernetes" not in bad.stderr and bad.stdout == ""
