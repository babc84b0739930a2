"""Serving configuration: the typed dataclasses behind `conf/serve.yaml`, their validation, and
`load_config(overrides)` for code paths that do not go through `@hydra.main` (`serve.app`).

`python -m serve.deploy` and `serve.app` both end in `to_serve_config`, so every value the
deployments see has been type-checked by Hydra and range-checked here, before Ray is touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from moe.config import ConfigError
from pipelines.core.config import check, compose_config, to_dataclass
from pipelines.core.model_source import QuantizedModelSourceConfig, check_model_source, check_quantization
from pipelines.core.tracking import TrackingConfig
from serve.limits import KeyLimits, load_api_keys


@dataclass
class ServedModelConfig(QuantizedModelSourceConfig):
    """Which model to serve (`ModelSourceConfig`: a directory, a run, or the registry, default its latest
    version; `model.quantization=int8|fp8` at load time) and how the replica runs it."""

    served_name: str | None = None  # the `model` id clients send; null: the registry name or directory name
    device: str = "cpu"  # cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16
    num_threads: int = 0  # torch intra-op threads per replica; 0: the replica's num_cpus (at least 1)


@dataclass
class EngineConfig:
    """Continuous batching inside one model replica."""

    max_batch_size: int = 32  # sequences decoded together (KV-cache slots); 1 turns batching off
    batch_wait_timeout_s: float = 0.005  # when idle, wait this long for more requests before a prefill
    max_waiting: int = 256  # sequences queued for a slot inside a replica; beyond: 503
    max_prefill_tokens: int = 4096  # padded prompt tokens admitted in one prefill pass (at least one prompt)
    default_max_tokens: int = 16  # completions without max_tokens (chat defaults to the rest of the context)
    max_n: int = 16  # largest `n` (choices per prompt)
    eos_token: str | None = "<|endoftext|>"  # ends generation when the tokenizer knows it
    log_interval_s: float = 10.0  # engine stats (batch size, queue, tokens/s) to the replica log
    expert_load_interval_s: float = 1.0  # how often per-layer expert load goes to the Ray metrics


@dataclass
class AutoscalingConfig:
    """Ray Serve request-based autoscaling of the model replicas: every `metrics_interval_s` each
    replica reports its ongoing requests; the controller averages them over `look_back_period_s`,
    wants ceil(total / target_ongoing_requests) replicas (within min/max), and acts once that wish has
    held for `upscale_delay_s` (more) or `downscale_delay_s` (fewer)."""

    min_replicas: int = 1
    max_replicas: int = 2
    initial_replicas: int | None = None
    target_ongoing_requests: float = 16.0  # ongoing requests per replica the controller aims at
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    look_back_period_s: float = 30.0  # the averaging window of the ongoing-request counts
    metrics_interval_s: float = 10.0  # how often replicas report them


@dataclass
class ModelDeploymentConfig:
    """The model replica's resource profile, scaling and backpressure."""

    num_replicas: int | None = None  # a fixed count; null: autoscaling below
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    max_ongoing_requests: int = 64  # requests in one replica at once (>= engine.max_batch_size)
    max_queued_requests: int = 128  # requests waiting at the caller for a replica; beyond: 503 (-1: no limit)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0


@dataclass
class ChatTemplateConfig:
    """A simple chat template: each message rendered with its role's format, then the generation prompt."""

    system: str = "<|system|>\n{content}\n"
    user: str = "<|user|>\n{content}\n"
    assistant: str = "<|assistant|>\n{content}\n"
    generation_prompt: str = "<|assistant|>\n"
    stop: list[str] = field(default_factory=lambda: ["<|user|>", "<|system|>"])  # added to every chat request


@dataclass
class LimitsConfig:
    """Per API key (per client address when the server takes no key), in each ingress replica;
    beyond them: 429 `rate_limit_exceeded` with Retry-After. A keys file line may override them."""

    requests_per_minute: float = 0.0  # 0: no rate limit
    burst: int = 10  # requests sent back to back before the rate applies
    max_concurrent: int = 0  # requests in flight at once; 0: no limit
    tokens_per_minute: float = 0.0  # prompt + completion tokens, charged when a request ends; 0: no budget

    def key_limits(self) -> KeyLimits:
        return KeyLimits(float(self.requests_per_minute), self.burst, self.max_concurrent,
                         float(self.tokens_per_minute))


@dataclass
class IngressConfig:
    """The OpenAI-compatible HTTP deployment (light: no model, no torch)."""

    num_replicas: int = 1
    num_cpus: float = 0.1
    max_ongoing_requests: int = 1024
    api_key_env: str = "MOE_API_KEY"  # if this environment variable is set, requests need `Bearer <key>`
    api_keys_file: str | None = None  # keys, one a line: `KEY [requests_per_minute=N] [burst=N] [max_concurrent=N]
    # [tokens_per_minute=N]`
    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies: 413
    limits: LimitsConfig = field(default_factory=LimitsConfig)


@dataclass
class SafetyRules:
    block_words: list[str] = field(default_factory=list)  # whole words/phrases, case-insensitive
    regexes: list[str] = field(default_factory=list)  # Python regular expressions (re.search)


@dataclass
class SafetyConfig:
    """Content filter: blocked input -> 400 policy error; blocked output -> finish_reason content_filter."""

    input: SafetyRules = field(default_factory=SafetyRules)
    output: SafetyRules = field(default_factory=SafetyRules)


@dataclass
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8000


@dataclass
class ServeConfig:
    app_name: str = "moe"
    route_prefix: str = "/"
    ray_address: str | None = None  # null: RAY_ADDRESS or a new local Ray; "auto"; ray://host:10001
    blocking: bool = True  # keep `python -m serve.deploy` in the foreground (needed when it started Ray)
    http: HttpConfig = field(default_factory=HttpConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    model: ServedModelConfig = field(default_factory=ServedModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    deployment: ModelDeploymentConfig = field(default_factory=ModelDeploymentConfig)
    chat: ChatTemplateConfig = field(default_factory=ChatTemplateConfig)
    ingress: IngressConfig = field(default_factory=IngressConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)


def register_configs() -> None:
    ConfigStore.instance().store(name="serve_schema", node=ServeConfig)


def validate_serve_config(c: ServeConfig) -> ServeConfig:
    e, d, a, m = c.engine, c.deployment, c.deployment.autoscaling, c.model
    check(e.max_batch_size >= 1, f"engine.max_batch_size={e.max_batch_size} must be >= 1 (1 disables batching).")
    check(e.batch_wait_timeout_s >= 0, f"engine.batch_wait_timeout_s={e.batch_wait_timeout_s} must be >= 0.")
    check(e.max_waiting >= 1, f"engine.max_waiting={e.max_waiting} must be >= 1.")
    check(e.max_prefill_tokens >= 1, f"engine.max_prefill_tokens={e.max_prefill_tokens} must be >= 1.")
    check(e.default_max_tokens >= 1, f"engine.default_max_tokens={e.default_max_tokens} must be >= 1.")
    check(e.max_n >= 1, f"engine.max_n={e.max_n} must be >= 1.")
    check(e.expert_load_interval_s > 0, f"engine.expert_load_interval_s={e.expert_load_interval_s} must be > 0.")
    check(d.max_ongoing_requests >= 1, f"deployment.max_ongoing_requests={d.max_ongoing_requests} must be >= 1.")
    check(d.max_queued_requests == -1 or d.max_queued_requests >= 0,
           f"deployment.max_queued_requests={d.max_queued_requests} must be >= 0, or -1 for no limit.")
    if d.num_replicas is not None:
        check(d.num_replicas >= 1, f"deployment.num_replicas={d.num_replicas} must be >= 1 (null: autoscaling).")
    else:
        check(0 <= a.min_replicas <= a.max_replicas and a.max_replicas >= 1,
               f"deployment.autoscaling: need 0 <= min_replicas ({a.min_replicas}) <= max_replicas "
               f"({a.max_replicas}) and max_replicas >= 1.")
        check(a.target_ongoing_requests > 0,
               f"deployment.autoscaling.target_ongoing_requests={a.target_ongoing_requests} must be > 0.")
        for key in ("upscale_delay_s", "downscale_delay_s", "look_back_period_s", "metrics_interval_s"):
            check(getattr(a, key) >= 0 if key.endswith("delay_s") else getattr(a, key) > 0,
                  f"deployment.autoscaling.{key}={getattr(a, key)} must be "
                  f"{'>= 0' if key.endswith('delay_s') else '> 0'} (seconds).")
    check(m.device in ("cpu", "cuda"), f"model.device={m.device!r}: use cpu or cuda.")
    check(m.dtype in ("float32", "bfloat16"), f"model.dtype={m.dtype!r}: use float32 or bfloat16.")
    check(m.device == "cpu" or d.num_gpus > 0,
           "model.device=cuda needs deployment.num_gpus > 0 so Ray gives the replica a GPU.")
    check_model_source(m)
    check_quantization(m)
    for side in ("input", "output"):
        for i, pattern in enumerate(getattr(c.safety, side).regexes):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"safety.{side}.regexes[{i}]={pattern!r} is not a valid regex: {err}.") from err
    check(c.route_prefix.startswith("/"), f"route_prefix={c.route_prefix!r} must start with '/'.")
    validate_ingress(c.ingress)
    return c


def validate_ingress(ing: IngressConfig) -> None:
    check(ing.max_body_bytes >= 1024, f"ingress.max_body_bytes={ing.max_body_bytes} must be >= 1024.")
    defaults = ing.limits.key_limits().check("ingress.limits.")
    if ing.api_keys_file:
        load_api_keys(ing.api_keys_file, defaults)  # the file exists and every line parses


def to_serve_config(cfg: DictConfig) -> ServeConfig:
    return validate_serve_config(to_dataclass(cfg, ServeConfig, "serve_schema"))


def load_config(overrides: list[str] | None = None) -> ServeConfig:
    """Compose conf/serve.yaml with Hydra overrides (the path `serve.app` takes)."""
    register_configs()
    return to_serve_config(compose_config("serve", overrides))
