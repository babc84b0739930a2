"""Typed configs of a fine-tuning run (`conf/finetune.yaml`, groups `lora/`, `privacy/`), built on
the training config (`FinetuneConfig` extends `TrainConfig`, so the training `Trainer` runs it), and
their checks, including the settings that would break a differential-privacy guarantee."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from moe.config import ModelConfig
from moe.lora import LoRAConfig
from pipelines.core.config import check, compose_config, to_dataclass
from pipelines.core.model_source import ModelSourceConfig, check_model_source
from pipelines.train.config import TrainConfig, validate_train_config
from pipelines.train.config import register_configs as register_train_configs


@dataclass
class BaseModelConfig(ModelSourceConfig):
    """The model to adapt: an exported directory (`path`), an MLflow run, a registered version (default:
    the latest of tracking.registered_model), or a transformers directory (`hf_path`: Glm4Moe, Ernie4_5_Moe)."""

    hf_path: str | None = None


@dataclass
class ChatFormat:
    """How a chat JSONL line ({"messages": [{"role", "content"}, ...]}) is rendered; the same format
    serving's default chat template renders (serve/config.py), so the model learns what it is asked."""

    system: str = "<|system|>\n{content}\n"
    user: str = "<|user|>\n{content}\n"
    assistant: str = "<|assistant|>\n{content}\n"


@dataclass
class FilesConfig:
    """The user's files; empty `paths`: the preprocessing pipeline's shards (`data.*`)."""

    paths: list[str] = field(default_factory=list)  # files or globs: plain text (.txt, ...) or chat JSONL
    format: str = "auto"  # auto (.jsonl: chat, else text) | text | chat
    val_fraction: float = 0.1  # of the examples (chat) or packed rows (text), at least one
    chat: ChatFormat = field(default_factory=ChatFormat)


@dataclass
class BalanceConfig:
    """Load-balancing settings the base model is fine-tuned with (the losses replace the base's own).
    The base's expert bias keeps steering the routing as it did in the base; it only moves when
    `update_expert_bias` (at the base's `bias_update_rate`)."""

    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    update_expert_bias: bool = False
    capacity_factor: float | None = None  # null: the base model's


@dataclass
class PrivacyConfig:
    """DP-SGD on the adapter parameters: Poisson sampling at rate expected_batch_size / examples,
    per-example clipping to max_grad_norm, Gaussian noise (noise_multiplier x max_grad_norm) and an
    opacus accountant; the noise multiplier is chosen so `train.steps` spend at most target_epsilon."""

    enabled: bool = False
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    expected_batch_size: int = 16  # examples per step over all ranks (the Poisson sample's mean)
    accountant: str = "rdp"  # rdp | prv (opacus)
    noise_multiplier: float | None = None  # null: the smallest that meets target_epsilon in train.steps


@dataclass
class FinetuneConfig(TrainConfig):
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    files: FilesConfig = field(default_factory=FilesConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)


def register_configs() -> None:
    register_train_configs()
    cs = ConfigStore.instance()
    cs.store(name="finetune_schema", node=FinetuneConfig)
    cs.store(group="lora", name="lora_schema", node=LoRAConfig)
    cs.store(group="privacy", name="privacy_schema", node=PrivacyConfig)


def compose_finetune_config(overrides: list[str] | None = None) -> FinetuneConfig:
    register_configs()
    return to_finetune_config(compose_config("finetune", overrides))


def to_finetune_config(cfg: DictConfig) -> FinetuneConfig:
    """Composed Hydra config -> checked `FinetuneConfig` (the model itself is checked once the base is read)."""
    c = to_dataclass(cfg, FinetuneConfig, "finetune_schema")
    check_model_source(c.base)
    check(not (c.base.hf_path and (c.base.path or c.base.run_id)),
          f"base.hf_path={c.base.hf_path!r} and base.path/base.run_id are both set; give one base model.")
    c.lora.validate()
    check(c.train.resume is None, f"train.resume={c.train.resume!r}: a fine-tuning run is not resumed (its base "
          "could resolve to another model by then); drop train.resume and start a new run.")
    check(c.files.format in ("auto", "text", "chat"), f"files.format={c.files.format!r}: use auto, text or chat.")
    check(0 < c.files.val_fraction < 1, f"files.val_fraction={c.files.val_fraction} must be within (0, 1).")
    apply_balance(c)
    check_privacy_settings(c)
    return c


def apply_balance(c: FinetuneConfig) -> None:
    """`balance.*` replaces the model's load-balancing settings (the base's own are the training's)."""
    b, moe = c.balance, c.model.moe
    moe.aux_loss_coef, moe.z_loss_coef = b.aux_loss_coef, b.z_loss_coef
    if b.capacity_factor is not None:
        moe.capacity_factor = b.capacity_factor


def with_base_model(c: FinetuneConfig, base: ModelConfig) -> FinetuneConfig:
    """The run's model: the base's config with `balance.*` applied, then every training check and
    the privacy refusals against it."""
    c.model = base
    c.data.vocab_size = base.vocab_size  # the tokenizer is the base's (checked against the data in the driver)
    apply_balance(c)
    validate_train_config(c)
    check_privacy_settings(c)
    return c


def check_privacy_settings(c: FinetuneConfig) -> None:
    """With privacy on, refuse (naming the key and the fix) every setting under which one example's
    influence on a step is not its own clipped gradient, or that the DP step does not support."""
    p, moe = c.privacy, c.model.moe
    if not p.enabled:
        return
    check(p.target_epsilon > 0 and 0 < p.delta < 1 and p.max_grad_norm > 0 and p.expected_batch_size > 0,
          "privacy.target_epsilon, privacy.max_grad_norm and privacy.expected_batch_size must be positive and "
          f"privacy.delta within (0, 1) (got {p.target_epsilon}, {p.max_grad_norm}, {p.expected_batch_size}, {p.delta}).")
    check(p.accountant in ("rdp", "prv"), f"privacy.accountant={p.accountant!r}: use rdp or prv.")
    refusals = [
        (moe.aux_loss_coef > 0, f"balance.aux_loss_coef={moe.aux_loss_coef}: the auxiliary load-balancing loss is a "
         "statistic of the whole batch's routing, so one example moves every other example's gradient; set "
         "balance.aux_loss_coef=0"),
        (c.balance.update_expert_bias and moe.bias_update_rate > 0, "balance.update_expert_bias=true: expert-bias "
         "updates move the routing by the batch's loads outside the clipped, noised gradient; set "
         "balance.update_expert_bias=false"),
        (moe.capacity_factor > 0, f"model.moe.capacity_factor={moe.capacity_factor}: capacity dropping makes one "
         "example's tokens decide which tokens of other examples are dropped; set balance.capacity_factor=0"),
        (moe.z_loss_coef > 0, f"balance.z_loss_coef={moe.z_loss_coef}: the router z-loss is averaged over the "
         "batch's tokens (a batch statistic shared between examples); set balance.z_loss_coef=0"),
        (c.lora.train_router or c.lora.train_embeddings, "lora.train_router/lora.train_embeddings: per-example "
         "gradients cover the adapter parameters only; set both to false"),
        (c.parallel.ep > 1 or c.parallel.pp > 1, f"parallel.ep={c.parallel.ep}, parallel.pp={c.parallel.pp}: the DP "
         "step clips each example on the rank that holds all of its gradient; use data parallelism only (ep=1, pp=1)"),
    ]
    for refused, why in refusals:
        check(not refused, f"privacy.enabled=true refuses {why}.")
