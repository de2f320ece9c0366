"""Pipeline recipes (configs/experiment/<name>.yaml with a ``pipeline`` section): typed and checked."""
from __future__ import annotations

import shutil

import pytest

import llmsys.config
from llmsys import pipeline
from llmsys.config.schema import (
    PIPELINE_PROBES,
    ConfigError,
    PipelineConfig,
    PipelineStageConfig,
)


def test_default_recipe_loads_in_order():
    recipe = pipeline.load_recipe("pipeline")
    assert [s.name for s in recipe.stages] == ["pretrain", "sft", "reward", "dpo", "ppo"]
    assert recipe.by_name()["ppo"].inputs == {"model.init_from": "sft", "ppo.reward_model": "reward"}
    assert pipeline.DEFAULT_STAGES == ("pretrain", "sft", "reward", "dpo", "ppo")
    assert set(pipeline.PROBES) == set(PIPELINE_PROBES)


@pytest.mark.parametrize("stage,key", [
    ({"name": "kto", "steps": 1}, r"pipeline\.stages\[kto\]\.name"),
    ({"name": "sft", "steps": 0}, r"pipeline\.stages\[sft\]\.steps"),
    ({"name": "sft", "steps": 1, "overrides": ["data"]}, r"pipeline\.stages\[sft\]\.overrides"),
    ({"name": "sft", "steps": 1, "overrides": ["trainer.max_steps=5"]}, r"overrides: sets trainer\.max_steps"),
    ({"name": "sft", "steps": 1, "inputs": {"trainer.output_dir": "pretrain"}}, r"inputs: sets trainer\.output_dir"),
    ({"name": "sft", "steps": 1, "overrides": ["model.init_from=x"], "inputs": {"model.init_from": "pretrain"}},
     r"pipeline\.stages\[sft\]\.inputs: sets model\.init_from"),
    ({"name": "sft", "steps": 1, "probes": ["vibes"]}, r"pipeline\.stages\[sft\]\.probes"),
])
def test_bad_stage_fails_naming_the_key(stage, key):
    with pytest.raises(ConfigError, match=key):
        PipelineStageConfig(**stage)


def test_inputs_must_read_an_earlier_stage_and_names_are_unique():
    sft = PipelineStageConfig(name="sft", steps=1, inputs={"model.init_from": "pretrain"})
    with pytest.raises(ConfigError, match="not an earlier stage"):
        PipelineConfig(stages=[sft, PipelineStageConfig(name="pretrain", steps=1)])
    with pytest.raises(ConfigError, match="twice"):
        PipelineConfig(stages=[PipelineStageConfig(name="pretrain", steps=1)] * 2)
    with pytest.raises(ConfigError, match="empty"):
        PipelineConfig()
    with pytest.raises(ConfigError, match="add an sft stage"):
        PipelineConfig(stages=[PipelineStageConfig(name="pretrain", steps=1, probes=["format_stop"])])
    assert PipelineConfig(stages=[PipelineStageConfig(name="pretrain", steps=1), sft]).by_name()["sft"] is sft


def test_a_training_recipe_or_a_missing_one_is_refused():
    with pytest.raises(ConfigError, match="no pipeline section"):
        pipeline.load_recipe("shakespeare_tiny")
    with pytest.raises(ConfigError, match="no configs/experiment/nope.yaml"):
        pipeline.load_recipe("nope")


def test_recipe_override_typo_fails_before_any_stage(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    shutil.copytree(llmsys.config.config_dir(), configs)
    (configs / "experiment" / "typo.yaml").write_text(
        "# @package _global_\ntrainer:\n  output_dir: outputs/experiment-typo\n"
        "pipeline:\n  stages:\n    - {name: pretrain, steps: 3, overrides: [optim.lrr=1]}\n")
    monkeypatch.setattr(llmsys.config, "config_dir", lambda: configs)
    with pytest.raises(ConfigError, match=r"typo\.yaml, stage pretrain: unknown config key 'optim\.lrr'"):
        pipeline.load_recipe.__wrapped__("typo")
