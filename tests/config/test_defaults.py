"""One source of defaults: the dataclass schema. YAML files select and override, never restate it."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llmsys.config import config_dir, register
from llmsys.config.schema import (
    Config,
    DeepSpeedConfig,
    DPOConfig,
    LoggerConfig,
    OptimConfig,
    PPOConfig,
    StageConfig,
    TrainerConfig,
)

CONFIGS = config_dir()
# Named recipes pin every value they depend on, defaults included, so that they stay reproducible.
RECIPES = CONFIGS / "experiment"
# configs/config.yaml holds only the group choices and Hydra's own settings.
ENTRY_KEYS = {"defaults", "hydra"}


def _yaml_files() -> list[Path]:
    return sorted(p for p in CONFIGS.rglob("*.yaml") if RECIPES not in p.parents)


def _default(f: dataclasses.Field) -> typing.Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _dataclass_of(hint: typing.Any) -> type | None:
    """The dataclass a field holds (``Optional[X]`` included), else None."""
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def schema_problems(node: dict, schema: type, where: str) -> list[str]:
    """Keys of ``node`` that ``schema`` lacks, and values equal to the schema's own default."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    problems = []
    for key, value in node.items():
        name = f"{where}.{key}"
        if key not in fields:
            problems.append(f"{name}: not a field of {schema.__name__} (valid: {', '.join(sorted(fields))})")
            continue
        nested = _dataclass_of(hints[key])
        if nested is not None and isinstance(value, dict):
            problems += schema_problems(value, nested, name)
        elif value == _default(fields[key]):
            problems.append(f"{name}: {value!r} restates the schema default ({schema.__name__}.{key})")
    return problems


def _schema_for(path: Path) -> tuple[type, str]:
    relative = path.relative_to(CONFIGS)
    if relative == Path("config.yaml"):
        return Config, "config"
    group = relative.parts[0]
    return _dataclass_of(typing.get_type_hints(Config)[group]), group


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_yaml_names_only_schema_keys_and_restates_no_default(path):
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    schema, where = _schema_for(path)
    if schema is Config:
        node = {k: v for k, v in node.items() if k not in ENTRY_KEYS}
    assert schema_problems(node, schema, where) == []


def test_the_check_sees_a_restated_default_and_an_unknown_key():
    assert schema_problems({"lr": 1e-3, "betas": [0.9, 0.95], "warmup_steps": 5}, OptimConfig, "optim") == [
        "optim.lr: 0.001 restates the schema default (OptimConfig.lr)",
        "optim.betas: [0.9, 0.95] restates the schema default (OptimConfig.betas)"]
    assert "trainer.max_stepz: not a field of TrainerConfig" in schema_problems(
        {"max_stepz": 3}, TrainerConfig, "trainer")[0]


@pytest.mark.parametrize("group,schema", [
    ("stage", StageConfig), ("trainer", TrainerConfig), ("optim", OptimConfig), ("logger", LoggerConfig),
    ("deepspeed", DeepSpeedConfig), ("dpo", DPOConfig), ("ppo", PPOConfig),
])
def test_default_config_is_the_dataclass_defaults(group, schema):
    register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["stage=pretrain"])
    # Unresolved, so trainer.output_dir compares as the schema's interpolation string.
    assert OmegaConf.to_container(cfg[group], resolve=False) == dataclasses.asdict(schema())
    assert cfg.pipeline is None
