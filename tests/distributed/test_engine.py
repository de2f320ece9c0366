"""The DeepSpeed door's pure parts (config, schedule, param groups) and its crash-safe save protocol."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmsys.config import DeepSpeedConfig, ModelConfig, OptimConfig, TrainerConfig
from llmsys.distributed import CheckpointError, DistInfo, Engine, deepspeed_config, latest_checkpoint, lr_multiplier, param_groups
from llmsys.distributed.engine import _GuardedWrites
from llmsys.models import Transformer


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_multiplier(0, cfg, 110) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg, 110) == pytest.approx(1.0)
    assert lr_multiplier(10, cfg, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi/2) = 0
    assert lr_multiplier(110, cfg, 110) == pytest.approx(0.1)
    assert lr_multiplier(500, cfg, 110) == pytest.approx(0.1)
    lin = OptimConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.0, schedule="linear")
    assert lr_multiplier(25, lin, 100) == pytest.approx(0.75)
    assert lr_multiplier(7, OptimConfig(warmup_steps=0, schedule="constant"), 100) == 1.0


def test_deepspeed_config_derives_accumulation_and_refuses_bad_batches():
    trainer = TrainerConfig(global_batch_size=32, micro_batch_size=4, precision="bf16")
    cfg = deepspeed_config(DeepSpeedConfig(stage=3, offload_optimizer=True, offload_param=True,
                                           extra={"zero_optimization": {"sub_group_size": 7}}),
                           OptimConfig(), trainer, world_size=2)
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["train_batch_size"] == 32
    assert cfg["bf16"]["enabled"] and cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["sub_group_size"] == 7  # extra is merged, not replacing the section
    assert cfg["optimizer"]["type"] == "AdamW"  # offloaded optimizer state is stepped by DeepSpeed's CPU Adam
    with pytest.raises(ValueError, match="not divisible by trainer.micro_batch_size \\* world_size = 4 \\* 3"):
        deepspeed_config(DeepSpeedConfig(), OptimConfig(), trainer, world_size=3)


def test_param_groups_skip_norms_and_count_tied_once():
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, vocab_size=50, tie_embeddings=True)
    model = Transformer(cfg)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


class _CrashingDeepSpeed:
    """Stands in for the DeepSpeed engine: writes a shard like it, or dies half way."""

    def __init__(self, crash: bool):
        self.crash = crash

    def save_checkpoint(self, root, tag, save_latest):
        assert save_latest is False  # llmsys publishes `latest` itself, last
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"partial" if self.crash else b"whole")
        if self.crash:
            raise OSError("disk full")


def _engine(crash: bool) -> Engine:
    engine = Engine.__new__(Engine)
    engine.dist = DistInfo(0, 1, 0, 1, torch.device("cpu"))
    engine.ds_cfg = DeepSpeedConfig()
    engine.engine = _CrashingDeepSpeed(crash)
    engine._writes = _GuardedWrites(None)
    return engine


def test_a_crash_during_save_keeps_the_last_good_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    good = _engine(crash=False).save_checkpoint(root, 10, {"samples_seen": 80}, keep=2)
    assert latest_checkpoint(root) == good
    with pytest.raises(OSError, match="disk full"):
        _engine(crash=True).save_checkpoint(root, 20, {"samples_seen": 160}, keep=2)
    assert latest_checkpoint(root) == good  # the marker still names the complete checkpoint
    assert (good / "mp_rank_00_model_states.pt").read_bytes() == b"whole"
    assert json.loads((good / "trainer_state.json").read_text())["step"] == 10
    assert not (root / "step_00000020").exists()
    # The next save cleans the debris and publishes; old ones beyond `keep` are pruned.
    _engine(crash=False).save_checkpoint(root, 20, {}, keep=2)
    _engine(crash=False).save_checkpoint(root, 30, {}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000020", "step_00000030"]
    assert latest_checkpoint(root).name == "step_00000030"


def test_latest_marker_pointing_at_a_missing_checkpoint_is_an_error(tmp_path):
    (tmp_path / "latest").write_text("step_00000005\n")
    with pytest.raises(CheckpointError, match="step_00000005"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "nothing_here") is None


def test_frozen_model_is_the_module_frozen_and_offload_keeps_it_on_the_cpu():
    import os
    from unittest import mock

    from llmsys.distributed import FrozenModel, init_distributed, shutdown

    cfg = ModelConfig(vocab_size=61, dim=32, n_layers=1, n_heads=4, ffn_dim=64, max_seq_len=32)
    torch.manual_seed(0)
    source = Transformer(cfg)
    ids = torch.randint(0, 61, (2, 9))
    with mock.patch.dict(os.environ):  # the single-process group's env vars must not leak into later tests
        dist = init_distributed(DeepSpeedConfig(stage=0))
        try:
            for offload in (False, True):
                frozen = FrozenModel(lambda: Transformer(cfg), ds=DeepSpeedConfig(stage=0), trainer=TrainerConfig(),
                                     dist=dist, init_state=source.state_dict(), offload=offload)
                assert not any(p.requires_grad for p in frozen.module.parameters()) and not frozen.module.training
                assert frozen.run_on == torch.device("cpu")
                logits = frozen(ids)
                assert not logits.requires_grad
                torch.testing.assert_close(logits, source(ids))
        finally:
            shutdown(dist)
