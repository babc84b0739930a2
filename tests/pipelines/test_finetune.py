"""`python -m pipelines.finetune` end to end (real Ray Train, MLflow, the training ingest) on the trained tiny model:
LoRA on the preprocessed shards from the registry (peft adapter == merged model, new registered
version tagged with its base, loadable like any version), DP-SGD on a chat JSONL file (epsilon per
step, within the target), and the settings refused before Ray starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe.config import ConfigError
from pipelines.finetune.config import to_finetune_config
from tests.pipelines.conftest import TrainedTiny


def finetune_overrides(t: TrainedTiny, tmp: Path, *extra: str) -> list[str]:
    return ["data=tiny", f"data.output_dir={t.dataset_root}", f"tracking.uri={t.tracking_uri}",
            f"tracking.registered_model={t.registered_model}", f"train.storage_path={tmp / 'runs'}",
            "train.micro_batch_size=4", "train.log_every=2", "train.eval_every=4", "train.eval_batches=1",
            "train.checkpoint_every=4", "train.steps=4", "optim.lr=0.01", "optim.warmup_steps=0",
            "lora.rank=4", "lora.alpha=8", *extra]


def run(compose, overrides: list[str], work: Path):
    from pipelines.finetune.config import register_configs
    from pipelines.finetune.driver import run_finetune

    register_configs()
    return run_finetune(to_finetune_config(compose("finetune", overrides)), "resolved: test\n", work)


def test_lora_finetune_from_the_registry_exports_peft_and_registers_a_version(
        trained_tiny: TrainedTiny, compose, tmp_path: Path) -> None:
    import transformers
    from mlflow import MlflowClient
    from peft import PeftModel

    from moe.checkpoint import load_model
    from pipelines.core.model_source import ModelSourceConfig, resolve_model
    from pipelines.core.tracking import TrackingConfig

    client = MlflowClient(tracking_uri=trained_tiny.tracking_uri)
    # the base: the registered version of the trained tiny run, whose transformers export the peft check loads
    # (other tests of the session register later versions of the same name)
    versions = client.search_model_versions(f"name='{trained_tiny.registered_model}'")
    base = next(v.version for v in versions if v.run_id == trained_tiny.run_id)
    out = run(compose, finetune_overrides(trained_tiny, tmp_path, f"base.version={base}"), tmp_path / "work")
    assert out.steps == 4 and out.model_version == max(int(v.version) for v in versions) + 1
    assert out.adapter_dir is not None and 0 < out.trainable_fraction < 0.2
    mv = client.get_model_version(trained_tiny.registered_model, str(out.model_version))
    assert mv.tags["base_version"] == str(base) and mv.tags["task"] == "finetune"
    assert client.get_run(out.run_id).data.metrics["lora/trainable_fraction"] == pytest.approx(out.trainable_fraction)
    # serving resolves the new version like any other; the peft adapter on the base's transformers export agrees
    resolved = resolve_model(ModelSourceConfig(registered_name=trained_tiny.registered_model,
                                               version=str(out.model_version)),
                             TrackingConfig(uri=trained_tiny.tracking_uri), dst=tmp_path / "served")
    merged = load_model(resolved.path)
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = merged(x)
        base = transformers.AutoModelForCausalLM.from_pretrained(trained_tiny.hf_dir, dtype=torch.float32)
        plain = base(x).logits
        theirs = PeftModel.from_pretrained(base, out.adapter_dir).eval()(x).logits
    assert (plain - ours).abs().max() > 1e-4  # the fine-tune changed the model
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_dp_finetune_on_chat_jsonl_logs_epsilon_per_step(trained_tiny: TrainedTiny, compose, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    chat = tmp_path / "chat.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                           {"role": "assistant", "content": f"{2 * i}"}]} for i in range(40)]
    chat.write_text("\n".join(json.dumps(line) for line in lines))
    out = run(compose, finetune_overrides(trained_tiny, tmp_path, f"base.path={trained_tiny.model_dir}",
                                          f"files.paths=[{chat}]", "privacy=dp", "privacy.expected_batch_size=8", "files.val_fraction=0.2",
                                          "train.steps=3"), tmp_path / "work")
    assert out.steps == 3 and out.epsilon is not None and 0 < out.epsilon <= 8.0
    history = MlflowClient(tracking_uri=trained_tiny.tracking_uri).get_metric_history(out.run_id, "privacy/epsilon")
    eps = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(out.epsilon)


def test_settings_that_break_the_privacy_guarantee_are_refused(compose) -> None:
    import copy

    from pipelines.finetune.config import check_privacy_settings, register_configs

    register_configs()
    with pytest.raises(ConfigError, match="privacy.enabled=true refuses balance.aux_loss_coef=0.01"):
        to_finetune_config(compose("finetune", ["privacy=dp", "balance.aux_loss_coef=0.01"]))
    with pytest.raises(ConfigError, match="train.resume='latest': a fine-tuning run is not resumed"):
        to_finetune_config(compose("finetune", ["train.resume=latest"]))
    ok = to_finetune_config(compose("finetune", ["privacy=dp"]))
    cases = {"balance.update_expert_bias": lambda c: setattr(c.balance, "update_expert_bias", True),
             "model.moe.capacity_factor": lambda c: setattr(c.model.moe, "capacity_factor", 1.25),
             "balance.z_loss_coef": lambda c: setattr(c.model.moe, "z_loss_coef", 0.001),
             "parallel.ep=2": lambda c: setattr(c.parallel, "ep", 2),
             "lora.train_router": lambda c: setattr(c.lora, "train_router", True)}
    for key, change in cases.items():
        bad = copy.deepcopy(ok)
        change(bad)
        with pytest.raises(ConfigError, match=f"privacy.enabled=true refuses {key}"):
            check_privacy_settings(bad)
        bad.privacy.enabled = False
        check_privacy_settings(bad)  # without privacy each is allowed


def test_an_unreachable_epsilon_is_refused_before_training() -> None:
    from pipelines.finetune.config import PrivacyConfig
    from pipelines.finetune.privacy import PrivacyBudgetError, plan_noise

    with pytest.raises(PrivacyBudgetError, match="privacy.target_epsilon=0.01 cannot be met in 1000 steps"):
        plan_noise(PrivacyConfig(enabled=True, target_epsilon=0.01, expected_batch_size=50), 100, 1000)
    with pytest.raises(PrivacyBudgetError, match="privacy.noise_multiplier=0.5 spends epsilon"):
        plan_noise(PrivacyConfig(enabled=True, noise_multiplier=0.5, expected_batch_size=10), 100, 1000)
    q, sigma, eps = plan_noise(PrivacyConfig(enabled=True, target_epsilon=8.0, expected_batch_size=10), 100, 50)
    assert q == 0.1 and sigma > 0 and eps <= 8.0 * 1.0001


def test_files_with_fewer_examples_than_a_global_batch_are_refused_before_training(
        trained_tiny: TrainedTiny, compose, tmp_path: Path) -> None:
    from pipelines.core.model_source import ResolvedModel
    from pipelines.finetune.config import register_configs
    from pipelines.finetune.driver import finetune_dataset
    from pipelines.train.driver import TrainingFailed

    register_configs()
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                       {"role": "assistant", "content": f"a{i}"}]}) for i in range(5)))
    cfg = to_finetune_config(compose("finetune", [f"files.paths=[{chat}]", "train.micro_batch_size=8"]))
    with pytest.raises(TrainingFailed, match="has 4 training sequences, fewer than one global batch"):
        finetune_dataset(cfg, ResolvedModel(trained_tiny.model_dir, "tiny"), tmp_path / "work")
