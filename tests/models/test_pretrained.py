"""Checkpoint configs: an export records the architecture only, old exports still load, and a run that starts
from a checkpoint builds its architecture with the run's own kernels (llmsys.models.pretrained, .export)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from llmsys.config import ConfigError, LoRAConfig, ModelConfig
from llmsys.config.schema import Architecture
from llmsys.models import Transformer, init_config, load_state, read_config, save_pretrained
from llmsys.models.heads import ScalarHeadModel, is_scalar_export
from llmsys.models.hf import config_to_hf
from llmsys.models.lora import merge_lora_state

ARCHITECTURE = {f.name for f in dataclasses.fields(Architecture)}

# config.json exactly as llmsys wrote it before the architecture was split from the run's choices: every
# ModelConfig field under "model" (a flash_attn run's kernels, its init_from, the merged LoRA's rank 0),
# here of a reward model (the "head" key) whose adapters were merged.
OLD_CONFIG_JSON = {
    "format": "llmsys",
    "head": "scalar",
    "merged_lora": {"alpha": 16.0, "dropout": 0.0, "rank": 4, "targets": ["wq", "wk", "wv", "wo"]},
    "model": {
        "activation_checkpointing": True, "attention": "flash_attn", "decode_attention": "torch", "dim": 32,
        "ffn_dim": 48, "ffn_multiple_of": 256, "init_from": "outputs/sft-tiny-chat/final", "init_std": 0.02,
        "lora": {"alpha": 16.0, "dropout": 0.0, "rank": 0, "targets": ["wq", "wk", "wv", "wo"]},
        "loss": "fused", "max_seq_len": 40, "mlp": "torch", "n_heads": 4, "n_kv_heads": 2, "n_layers": 2,
        "name": "old", "norm": "fused", "norm_eps": 1e-05, "pad_vocab_multiple": 64, "qkv_bias": False,
        "rope": "torch", "rope_theta": 10000.0, "tie_embeddings": True, "vocab_size": 61,
    },
    "stage": "reward",
}

SAVED = ModelConfig(name="saved", vocab_size=71, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=80,
                    max_seq_len=48, rope_theta=5e5, norm_eps=1e-6, qkv_bias=True, init_std=0.03)
# A run whose own architecture differs from SAVED's in every field, with every implementation switch moved.
RUN = ModelConfig(name="run", vocab_size=0, pad_vocab_multiple=32, dim=128, n_layers=3, n_heads=4, n_kv_heads=None,
                  ffn_dim=0, ffn_multiple_of=64, max_seq_len=96, rope_theta=1e4, norm_eps=1e-5, tie_embeddings=True,
                  qkv_bias=False, init_std=0.01, activation_checkpointing=True, attention="triton", loss="fused",
                  norm="fused", rope="fused", mlp="fused", decode_attention="fused", init_from="elsewhere",
                  lora=LoRAConfig(rank=4, alpha=8.0, targets=["wq", "w2"]))


def _export(path, cfg: ModelConfig, **extra):
    torch.manual_seed(0)
    return save_pretrained(Transformer(cfg).state_dict(), cfg, path, extra=extra)


def test_export_records_the_architecture_and_the_stage_keys(tmp_path):
    run = dataclasses.replace(SAVED, activation_checkpointing=True, norm="fused", init_from="somewhere")
    out = _export(tmp_path / "final", run, stage="sft", merged_lora={"rank": 4})
    meta = json.loads((out / "config.json").read_text())
    assert meta["model"] == SAVED.architecture_dict() and set(meta["model"]) == ARCHITECTURE
    assert (meta["format"], meta["stage"], meta["merged_lora"]) == ("llmsys", "sft", {"rank": 4})
    assert read_config(out) == SAVED  # default kernels, no init_from: nothing of the run that wrote it


def test_export_written_before_the_split_loads(tmp_path):
    old = tmp_path / "reward"
    old.mkdir()
    (old / "config.json").write_text(json.dumps(OLD_CONFIG_JSON, indent=2, sort_keys=True))
    architecture = {k: v for k, v in OLD_CONFIG_JSON["model"].items() if k in ARCHITECTURE}
    torch.manual_seed(1)
    written = ScalarHeadModel(ModelConfig(**architecture))
    save_file(written.state_dict(), str(old / "model.safetensors"), metadata={"format": "llmsys"})

    cfg = read_config(old)
    # The run-time fields it carries are ignored: flash_attn need not be installed to read it.
    assert cfg == ModelConfig(**architecture)
    assert (cfg.attention, cfg.loss, cfg.norm, cfg.activation_checkpointing) == ("sdpa", "eager", "torch", False)
    assert cfg.init_from is None and cfg.lora == LoRAConfig()
    assert is_scalar_export(old)
    model = ScalarHeadModel(cfg)
    # Every parameter found; the only extra is the tied LM head load_state aliases, which a scalar model lacks.
    assert model.load_state_dict(load_state(old, cfg), strict=False).missing_keys == []
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, written.state_dict()[name]), name
    started = init_config(old, dataclasses.replace(RUN, decode_attention="torch"))  # head_dim 8: no fused decode
    assert started.architecture_dict() == cfg.architecture_dict() and started.attention == "triton"


def test_init_config_takes_the_architecture_from_the_checkpoint_and_the_rest_from_the_run(tmp_path):
    out = _export(tmp_path / "final", SAVED)
    cfg = init_config(out, RUN)
    assert isinstance(cfg, ModelConfig)
    for f in dataclasses.fields(ModelConfig):
        if f.name == "init_from":
            assert cfg.init_from == str(out)
        elif f.name in ARCHITECTURE:
            assert getattr(cfg, f.name) == getattr(SAVED, f.name), f.name
        else:
            assert getattr(cfg, f.name) == getattr(RUN, f.name), f.name
    assert cfg.lora is RUN.lora
    # The model it builds holds the checkpoint's weights under the run's adapters.
    model = Transformer(cfg)
    missing = model.load_state_dict(load_state(out, cfg), strict=False).missing_keys
    assert missing and all(name.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for name in missing)


def test_init_config_reads_a_hugging_face_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(SAVED)))  # read_config needs no weights
    cfg = init_config(tmp_path, RUN)
    assert (cfg.dim, cfg.n_layers, cfg.kv_heads, cfg.hidden_dim, cfg.qkv_bias) == (64, 2, 1, 80, True)
    assert (cfg.attention, cfg.decode_attention, cfg.lora) == ("triton", "fused", RUN.lora)
    assert cfg.init_from == str(tmp_path)


def test_init_config_checks_the_runs_kernels_against_the_checkpoints_shapes(tmp_path):
    out = _export(tmp_path / "final", dataclasses.replace(SAVED, dim=40, n_heads=2))  # head_dim 20
    with pytest.raises(ConfigError, match=r"model\.decode_attention: .*this model has 20"):
        init_config(out, RUN)


def test_unknown_model_field_is_refused(tmp_path):
    out = _export(tmp_path / "final", SAVED)
    meta = json.loads((out / "config.json").read_text())
    meta["model"]["sliding_window"] = 16
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"config\.json: .*does not know: sliding_window"):
        read_config(out)


def test_unmerged_adapters_are_refused(tmp_path):
    cfg = dataclasses.replace(SAVED, lora=LoRAConfig(rank=2))
    state = Transformer(cfg).state_dict()
    with pytest.raises(ValueError, match="merge_lora_state"):
        save_pretrained(state, cfg, tmp_path / "final")
    assert not (tmp_path / "final").exists() and not (tmp_path / "final.tmp").exists()
    save_pretrained(merge_lora_state(state, cfg), cfg, tmp_path / "final")
    assert read_config(tmp_path / "final") == SAVED


def test_an_export_given_as_tokenizer_dir_lends_only_its_tokenizer(tmp_path):
    """A script that passes an earlier export as ``tokenizer_dir`` once had that export's weights and config
    copied over the new ones: the new export must hold the new state, the tokenizer files the old export's."""
    cfg = ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=16)
    torch.manual_seed(0)
    old = Transformer(cfg)
    first = save_pretrained(old.state_dict(), cfg, tmp_path / "first", extra={"stage": "pretrain"})
    (first / "tokenizer.json").write_text("{}")
    new = Transformer(cfg)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(1.0)
    second = save_pretrained(new.state_dict(), cfg, tmp_path / "second", tokenizer_dir=first, extra={"stage": "sft"})
    assert json.loads((second / "config.json").read_text())["stage"] == "sft"
    assert (second / "tokenizer.json").read_text() == "{}"
    loaded = load_state(second, read_config(second))
    for name, value in new.state_dict().items():
        if name in loaded:
            torch.testing.assert_close(loaded[name], value)
