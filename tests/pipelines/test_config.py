"""Every config composes; bad overrides fail before Ray starts with a message naming the key and the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import ClusterConfig
from moe.config import ConfigError
from pipelines.train.config import TrainConfig, compose_train_config, to_train_config
from pipelines.train.plan import make_plan

REPO = Path(__file__).resolve().parents[2]
MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
CLUSTERS = sorted(p.stem for p in (REPO / "conf" / "cluster").glob("*.yaml") if not p.stem.startswith("_"))


def run_train(*overrides: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipelines.train", *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_presets_and_profiles_exist() -> None:
    assert {"tiny", "small", "deepseek_moe_16b", "moe_67b"} <= set(MODELS)
    assert {"local", "a100", "h100", "mi250", "mi300x"} <= set(CLUSTERS)


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_and_cluster_composes(compose, model: str, cluster: str) -> None:
    data = ["data=tiny"] if model == "tiny" else []  # the tiny model pairs with the tiny vocabulary
    if model in ("deepseek_moe_16b", "moe_67b") and cluster != "local":  # 8 GPUs of data parallelism do not fit
        data += ["parallel=auto", "cluster.num_workers=64"]
    cfg = to_train_config(compose("train", [f"model={model}", f"+cluster={cluster}", *data]))
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.name == model and cfg.cluster.name == cluster
    plan = make_plan(cfg)
    assert plan.active_params < plan.total_params


def test_default_is_local_cpu(compose) -> None:
    cfg = to_train_config(compose("train"))
    assert (cfg.cluster.name, cfg.cluster.device, cfg.cluster.backend, cfg.cluster.dtype) == (
        "local", "cpu", "gloo", "float32")
    assert cfg.model.name == "small"


def test_vendor_bases_are_shared(compose) -> None:
    nvidia = [to_train_config(compose("train", [f"+cluster={c}"])).cluster for c in ("a100", "h100")]
    amd = [to_train_config(compose("train", [f"+cluster={c}"])).cluster for c in ("mi250", "mi300x")]
    assert {(c.vendor, c.backend, c.device, c.dtype) for c in nvidia} == {("nvidia", "nccl", "cuda", "bfloat16")}
    assert {(c.vendor, c.backend, c.device, c.dtype) for c in amd} == {("amd", "nccl", "cuda", "bfloat16")}
    assert all("HSA_FORCE_FINE_GRAIN_PCIE" in c.env for c in amd)


def test_deepseek_preset_parameter_counts(compose) -> None:
    plan = make_plan(to_train_config(compose("train", ["model=deepseek_moe_16b", "+cluster=h100", "parallel=auto"])))
    assert 16.0e9 < plan.total_params < 16.8e9  # DeepSeek-MoE-16B: 16.4B total
    assert 2.6e9 < plan.active_params < 3.0e9  # ~2.8B active


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.moe.top_k=40", "model.moe.top_k=40 > model.moe.n_routed_experts=16"),
        ("model.n_heads=3", "model.d_model=256 is not divisible by model.n_heads=3"),
        ("data.seq_len=1024", "data.seq_len=1024 exceeds model.max_seq_len=512"),
        ("parallel.ep=3", "model.moe.n_routed_experts=16 is not divisible by parallel.ep=3"),
        ("cluster.backend=nccl", "cluster.backend=nccl needs cluster.device=cuda"),
        ("optim.lr=-1", "optim.lr=-1.0 must be positive"),
    ],
)
def test_impossible_values_name_the_key(compose, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        to_train_config(compose("train", [override]))


def test_bad_overrides_fail_before_ray_starts() -> None:
    bad_value = run_train("model.moe.top_k=40")
    assert bad_value.returncode == 2
    assert "config error: model.moe.top_k=40 > model.moe.n_routed_experts=16" in bad_value.stderr
    unknown = run_train("model.n_expertz=4")
    assert unknown.returncode != 0 and "n_expertz" in unknown.stderr
    wrong_type = run_train("train.steps=many")
    assert wrong_type.returncode != 0 and "train.steps" in wrong_type.stderr
    for proc in (bad_value, unknown, wrong_type):
        assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_dry_run_prints_the_plan_for_a_gpu_profile_without_gpus() -> None:
    proc = run_train("+cluster=a100", "model=deepseek_moe_16b", "parallel.ep=8",
                     "train.activation_checkpointing=moe", "train.dry_run=true")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "memory/device" in out and "GiB usable (fits)" in out and "tokens/s" in out  # the planner's lines
    assert "profile        a100" in out
    assert "device         cuda / backend nccl / dtype bfloat16" in out
    assert "global 128 seq" in out and "16,375,728,128 total" in out


def test_gpu_profile_without_gpus_fails_fast_naming_need_and_have() -> None:
    proc = run_train("+cluster=a100", timeout=90)
    assert proc.returncode == 1
    assert "cluster profile 'a100' needs 8 workers x 8 CPU, 1 A100 GPU each (8 GPUs in all)" in proc.stderr
    assert "0 GPU" in proc.stderr


EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
ENTRY_POINTS = sorted(p.stem for p in (REPO / "conf").glob("*.yaml"))


def test_recipes_exist() -> None:
    assert {"tiny_smoke", "ep2_small", "deepseek16b_h100"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_recipe_composes_and_validates(experiment: str) -> None:
    cfg = compose_train_config([f"+experiment={experiment}"])
    plan = make_plan(cfg)
    assert plan.active_params < plan.total_params
    text = (REPO / "conf" / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert f"+experiment={experiment}" in text  # each recipe shows the command that runs it


def test_recipes_select_their_groups_and_steps() -> None:
    smoke = compose_train_config(["+experiment=tiny_smoke"])
    assert (smoke.model.name, smoke.data.name, smoke.cluster.name, smoke.train.steps) == ("tiny", "tiny", "local", 20)
    ep2 = compose_train_config(["+experiment=ep2_small", "train.steps=7"])  # the command line wins over a recipe
    assert (ep2.model.name, ep2.parallel.ep, ep2.train.steps) == ("small", 2, 7)
    gpu = compose_train_config(["+experiment=deepseek16b_h100"])
    assert (gpu.model.name, gpu.cluster.name, gpu.parallel.ep) == ("deepseek_moe_16b", "h100", 8)
    # The form cluster.submit's RayJob runs (+cluster=<profile> first) composes too; another profile is
    # chosen with cluster=NAME after the recipe.
    assert compose_train_config(["+cluster=h100", "+experiment=deepseek16b_h100"]).cluster.name == "h100"
    assert compose_train_config(["+experiment=deepseek16b_h100", "cluster=a100"]).cluster.name == "a100"


def test_local_profile_is_the_schema_defaults(compose) -> None:
    default = to_train_config(compose("train")).cluster
    assert to_train_config(compose("train", ["+cluster=local"])).cluster == default == ClusterConfig()
    assert to_train_config(compose("train", ["+cluster=a100"])).cluster.name == "a100"


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_uses_the_shared_hydra_run_dir(name: str) -> None:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from cluster.monitor import register_configs as register_monitor_configs
    from cluster.submit import register_configs as register_submit_configs
    from pipelines.data.config import register_configs as register_data_configs
    from pipelines.evaluation.config import register_configs as register_evaluation_configs
    from pipelines.finetune.config import register_configs as register_finetune_configs
    from pipelines.train.config import register_configs as register_train_configs
    from serve.config import register_configs as register_serve_configs

    for register in (register_train_configs, register_data_configs, register_serve_configs, register_submit_configs,
                     register_evaluation_configs, register_finetune_configs, register_monitor_configs):
        register()
    assert "hydra:" not in (REPO / "conf" / f"{name}.yaml").read_text()  # one place: conf/hydra/default.yaml
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name=name, overrides=["hydra/job_logging=disabled"], return_hydra_config=True)
    hc = cfg.hydra
    assert hc.run.dir.startswith(f"outputs/hydra/{name}/") and hc.job.chdir is False
    # Hydra's own groups still compose, and overriding one still works.
    assert hc.runtime.choices["hydra/launcher"] == "basic"
    assert hc.runtime.choices["hydra/job_logging"] == "disabled"


def test_a_run_writes_its_hydra_dir_under_outputs_hydra_train(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipelines.train", "train.dry_run=true"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "outputs" / "hydra" / "train").iterdir()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert list(tmp_path.iterdir()) == [tmp_path / "outputs"]  # no chdir: nothing else written beside it
