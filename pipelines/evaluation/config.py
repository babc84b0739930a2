"""Typed configs of `python -m pipelines.evaluate` (`conf/evaluate.yaml`) and `python -m pipelines.export`
(`conf/export.yaml`), their checks (every message names the key, the value and the fix) and Hydra
registration. The corpus schema is `pipelines.data.config.DataConfig`, tracking's
`pipelines.core.tracking.TrackingConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from pipelines.core.config import check, compose_config, to_dataclass
from pipelines.core.model_source import (
    ModelSourceConfig,
    QuantizedModelSourceConfig,
    check_model_source,
    check_quantization,
)
from pipelines.core.tracking import TrackingConfig
from pipelines.data.config import DataConfig

RECORD_MODES = ("new_run", "model_run", "none")


@dataclass
class ValidationConfig:
    """Loss, perplexity and bits per byte on the preprocessed validation split (`data`)."""

    enabled: bool = True
    max_sequences: int = 256  # evenly spaced over the split; 0: all of it
    batch_size: int = 16


@dataclass
class FilesConfig:
    """The same metrics on files a user names: text (any extension), .jsonl or .parquet."""

    paths: list[str] = field(default_factory=list)
    text_field: str = "text"  # the JSONL key / Parquet column holding the text
    max_tokens: int = 200_000  # per file; the rest is not scored
    batch_size: int = 8


@dataclass
class SamplesConfig:
    """Greedy continuations of a few prompts."""

    prompts: list[str] = field(default_factory=lambda: ["def main(", "import os\n", "class Config:\n    ",
                                                        "    for i in range("])
    max_new_tokens: int = 48


@dataclass
class ChoiceConfig:
    """Multiple choice from held-out source (the validation split): the real next line against
    distractor lines of similar length from other documents, scored by log-likelihood."""

    enabled: bool = True
    questions: int = 100
    choices: int = 4
    context_lines: int = 6  # lines of context before the line to choose
    min_line_chars: int = 16  # shorter (stripped) lines are not asked about
    max_sequences: int = 2048  # validation sequences decoded to find the lines
    seed: int = 0


@dataclass
class EvaluateConfig:
    model: QuantizedModelSourceConfig = field(default_factory=QuantizedModelSourceConfig)  # model.quantization=int8
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    files: FilesConfig = field(default_factory=FilesConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    choice: ChoiceConfig = field(default_factory=ChoiceConfig)
    record: str = "new_run"  # new_run (an evaluation run linked to the model's) | model_run | none
    compare: list[str] = field(default_factory=list)  # two registered versions, e.g. compare=[1,2]
    num_threads: int = 0  # torch intra-op threads; 0: torch's default


@dataclass
class ExportConfig:
    model: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    out_dir: str | None = None  # null: outputs/hf/<model name>[-v<version>]
    eos_token: str | None = "<|endoftext|>"  # special tokens of the exported tokenizer (when in its vocabulary)
    pad_token: str | None = "<|pad|>"
    log_to_run: bool = True  # log the directory as artifact `hf` of the model's run (run or registry source)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="tracking", name="tracking_schema", node=TrackingConfig)


def validate_evaluate_config(c: EvaluateConfig) -> EvaluateConfig:
    check_model_source(c.model)
    check_quantization(c.model)
    check(c.record in RECORD_MODES, f"record={c.record!r}: use one of {', '.join(RECORD_MODES)}.")
    check(len(c.compare) in (0, 2), f"compare={c.compare} needs exactly two registered versions, e.g. compare=[1,2].")
    check(not (c.compare and (c.model.path or c.model.run_id)),
          "compare= compares two registered versions of model.registered_name; drop model.path / model.run_id.")
    for key, value in (("validation.max_sequences", c.validation.max_sequences), ("files.max_tokens", c.files.max_tokens),
                       ("samples.max_new_tokens", c.samples.max_new_tokens), ("choice.questions", c.choice.questions)):
        check(value >= 0, f"{key}={value} must be >= 0.")
    for key, value in (("validation.batch_size", c.validation.batch_size), ("files.batch_size", c.files.batch_size),
                       ("choice.context_lines", c.choice.context_lines)):
        check(value > 0, f"{key}={value} must be positive.")
    check(c.choice.choices >= 2, f"choice.choices={c.choice.choices} must be at least 2 (the real line and a distractor).")
    return c


def validate_export_config(c: ExportConfig) -> ExportConfig:
    check_model_source(c.model)
    return c


def to_evaluate_config(cfg: DictConfig) -> EvaluateConfig:
    return validate_evaluate_config(to_dataclass(cfg, EvaluateConfig, "evaluate_schema"))


def to_export_config(cfg: DictConfig) -> ExportConfig:
    return validate_export_config(to_dataclass(cfg, ExportConfig, "export_schema"))


def compose_evaluate_config(overrides: list[str] | None = None) -> EvaluateConfig:
    register_configs()
    return to_evaluate_config(compose_config("evaluate", overrides))


def compose_export_config(overrides: list[str] | None = None) -> ExportConfig:
    register_configs()
    return to_export_config(compose_config("export", overrides))
