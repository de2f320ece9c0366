"""Every YAML composes into the typed schema; bad overrides fail at start and name the key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from llmsys.config import Config, ConfigError, config_dir, register, to_config, unknown_override_error

CONFIGS = config_dir()
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name != "experiment")


def _compose(overrides: list[str]) -> Config:
    register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=overrides))


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONFIGS / g).glob("*.yaml"))])
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if (group, option) == ("data", "files"):
        overrides.append(f"data.path={CONFIGS}")
    if (group, option) == ("data", "hf"):
        overrides.append("data.dataset=wikitext")
    if group == "stage" and option in ("reward", "ppo", "dpo", "grpo"):  # they start from a previous stage's export
        overrides += ["model.init_from=outputs/sft-tiny-chat/final", "ppo.reward_model=outputs/reward/final"]
    cfg = _compose(overrides)
    assert isinstance(cfg, Config)
    assert getattr(cfg, group).__class__.__name__.endswith("Config")


@pytest.mark.parametrize("experiment", [p.stem for p in sorted((CONFIGS / "experiment").glob("*.yaml"))])
def test_every_experiment_composes(experiment):
    cfg = _compose([f"experiment={experiment}"])
    assert cfg.trainer.output_dir.endswith(experiment)


def test_defaults_are_the_embedded_pretraining_run():
    cfg = _compose([])
    assert cfg.stage.name == "pretrain" and cfg.model.name == "tiny" and cfg.deepspeed.stage == 0
    assert Path(cfg.data.path).is_dir() and cfg.data.path.endswith("plays")
    # Deterministic, never a timestamp: every rank derives the same directory.
    assert cfg.trainer.output_dir == "outputs/pretrain-tiny-shakespeare"


def test_unknown_key_fails_in_hydra_and_names_it():
    with pytest.raises(ConfigCompositionException, match="lrr"):
        _compose(["optim.lrr=1"])


def test_unknown_key_message_lists_valid_keys():
    msg = unknown_override_error(["optim.lrr=1"])
    assert "optim.lrr" in msg and "lr" in msg and "warmup_steps" in msg
    assert unknown_override_error(["optim.lr=1", "model=tiny", "deepspeed.extra.foo=1", "+x=1"]) is None
    assert "trainer.max_stepz" in unknown_override_error(["trainer.max_stepz=3"])


def test_wrong_type_and_bad_choice_fail():
    with pytest.raises(ConfigCompositionException, match="max_steps"):
        _compose(["trainer.max_steps=lots"])
    with pytest.raises(ConfigCompositionException, match="model"):
        _compose(["model=gpt5"])


@pytest.mark.parametrize("override,key", [
    ("trainer.precision=fp8", "trainer.precision"),
    ("deepspeed.stage=4", "deepspeed.stage"),
    ("model.n_kv_heads=4", "model.n_kv_heads"),
    ("optim.schedule=exp", "optim.schedule"),
    ("data.seq_len=512", "data.seq_len"),  # longer than model.max_seq_len
    ("trainer.micro_batch_size=5", "trainer.global_batch_size"),
    ("deepspeed.offload_param=true", "deepspeed.offload_param"),
])
def test_invalid_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _compose([override])


@pytest.mark.parametrize("overrides,key", [
    (["stage=dpo"], "model.init_from"),
    (["stage=reward"], "model.init_from"),
    (["stage=ppo", "model.init_from=x"], "ppo.reward_model"),
    (["stage=ppo", "model.init_from=x", "ppo.reward_model=y", "ppo.rollout_batch_size=20"],
     "ppo.rollout_batch_size"),
    (["dpo.loss_type=kto"], "dpo.loss_type"),
    (["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"], "dpo.label_smoothing"),
    (["ppo.kl_estimator=k4"], "ppo.kl_estimator"),
    (["ppo.lam=1.5"], "ppo.lam"),
])
def test_alignment_settings_are_checked(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _compose(overrides)


def test_cli_rejects_typo_before_starting(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llmsys.train", "optim.lrr=1"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "optim.lrr" in proc.stderr and "Valid keys of optim" in proc.stderr
