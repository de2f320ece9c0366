"""The model config is an Architecture (what a checkpoint records) extended by the run's implementation
choices; to the command line it is still one ``model`` group with the same keys and checks."""
from __future__ import annotations

import dataclasses

import pytest

from llmsys.config import ConfigError, LoRAConfig, ModelConfig, unknown_override_error
from llmsys.config.schema import Architecture
from tests.config.test_config import _compose

SAVED = ("name", "vocab_size", "pad_vocab_multiple", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
         "ffn_multiple_of", "max_seq_len", "rope_theta", "norm_eps", "tie_embeddings", "qkv_bias", "init_std")
RUN_TIME = ("activation_checkpointing", "attention", "loss", "norm", "rope", "mlp", "decode_attention", "init_from",
            "lora")


def test_fields_split_into_architecture_and_run_time():
    assert tuple(f.name for f in dataclasses.fields(Architecture)) == SAVED
    assert tuple(f.name for f in dataclasses.fields(ModelConfig)) == SAVED + RUN_TIME
    assert set(ModelConfig().architecture_dict()) == set(SAVED)


def test_command_line_keys_reach_both_parts():
    cfg = _compose(["model.attention=triton", "model.lora.rank=4", "model.dim=128", "model.n_heads=4"]).model
    assert isinstance(cfg, ModelConfig) and isinstance(cfg, Architecture)
    assert (cfg.attention, cfg.lora.rank, cfg.dim, cfg.head_dim) == ("triton", 4, 128, 32)
    msg = unknown_override_error(["model.dimm=3"])
    assert "model.dimm" in msg and all(key in msg for key in ("dim", "attention", "lora", "init_std"))


@pytest.mark.parametrize("overrides,key", [
    (["model.dim=100"], "model.dim"),  # not divisible by the tiny preset's 6 heads
    (["model.n_layers=0"], "model.n_layers"),
    (["model.attention=xformers"], "model.attention"),
    (["model.norm=apex"], "model.norm"),
    (["model.decode_attention=fused", "model.dim=240"], "model.decode_attention"),  # head_dim 40: no kernel
    (["model.lora.rank=-1"], "model.lora.rank"),
])
def test_invalid_values_still_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _compose(overrides)


def test_with_architecture_keeps_the_runs_implementation():
    run = ModelConfig(attention="triton", norm="fused", activation_checkpointing=True, init_from="x",
                      lora=LoRAConfig(rank=2))
    saved = Architecture(name="ckpt", vocab_size=99, dim=64, n_layers=2, n_heads=2, tie_embeddings=True)
    cfg = run.with_architecture(saved)
    assert cfg.architecture_dict() == saved.architecture_dict()
    assert (cfg.attention, cfg.norm, cfg.activation_checkpointing, cfg.init_from, cfg.lora) == \
        ("triton", "fused", True, "x", LoRAConfig(rank=2))
