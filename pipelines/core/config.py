"""Config composition and checks shared by every entry point: compose `conf/<name>.yaml` outside
`@hydra.main`, turn a composed DictConfig into its dataclass, and `check` for the cross-field
rules that name the key, the value and the fix.

Each package owns its own schemas (`cluster.config`, `pipelines.data.config`,
`pipelines.train.config`, `serve.config`) and registers them in Hydra's ConfigStore before it
composes; this module knows none of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from moe.config import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def check(cond: bool, message: str) -> None:
    """Raise ConfigError(message) unless `cond`: messages name the key, the value and the fix."""
    if not cond:
        raise ConfigError(message)


T = TypeVar("T")


def to_dataclass(cfg: DictConfig, cls: type[T], schema: str) -> T:
    """A composed DictConfig -> the dataclass instance its schema describes."""
    obj: Any = OmegaConf.to_object(cfg)
    if not isinstance(obj, cls):
        raise ConfigError(f"the config did not compose against its schema ({schema}); keep `{schema}` first "
                          "in the defaults list.")
    return obj


def compose_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/<name>.yaml with overrides outside `@hydra.main` (library callers, app builders)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=name, overrides=list(overrides or []))
    finally:
        GlobalHydra.instance().clear()
