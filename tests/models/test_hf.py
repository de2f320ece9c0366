"""Hugging Face interop (llmsys/models/hf.py): tiny random transformers models through import and export
must give the same logits, and what llmsys cannot compute must be refused by name."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmsys.config import ModelConfig
from llmsys.data import load_sft_data
from llmsys.models import Transformer, load_state, read_config, save_pretrained
from llmsys.models.hf import (
    config_from_hf,
    config_to_hf,
    export_hf,
    import_hf,
    is_hf_checkpoint,
    load_hf,
    main,
    save_hf,
)
from tests.trainers.helpers import train, train_losses

transformers = pytest.importorskip("transformers")

# Odd sizes, grouped-query attention (6 query heads over 2 or 3 kv heads, head_dim 8).
TINY = dict(vocab_size=211, hidden_size=48, intermediate_size=88, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=5e5)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}
CASES = [
    ("llama", dict(tie_word_embeddings=False)),
    ("llama", dict(tie_word_embeddings=True, num_key_value_heads=3)),
    ("qwen2", dict(tie_word_embeddings=False)),  # bias on q/k/v
    ("qwen2", dict(tie_word_embeddings=True, use_sliding_window=False, sliding_window=16)),  # window ignored
    ("mistral", dict(tie_word_embeddings=False, sliding_window=64)),  # a window covering every position
]
ATOL = RTOL = 1e-5  # fp32; the rotary tables differ only in rounding (fp64 here, fp32 in transformers)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    # Random init leaves norms at 1 and biases at 0; move every parameter so each mapping is exercised.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _tiny_hf(family: str, **overrides):
    config_cls, model_cls = (getattr(transformers, name) for name in FAMILIES[family])
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**TINY, **overrides})).eval()
    _perturb(model, seed=1)
    return model


def _ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 23), generator=torch.Generator().manual_seed(2))


def _reload(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("family,overrides", CASES, ids=lambda c: c if isinstance(c, str) else
                         "tied" if c.get("tie_word_embeddings") else "untied")
@torch.no_grad()
def test_hf_round_trip_same_logits(tmp_path, family, overrides):
    hf_model = _tiny_hf(family, **overrides)
    hf_model.save_pretrained(tmp_path / "hf")
    ids = _ids(TINY["vocab_size"])
    expected = hf_model(ids).logits

    cfg, state = load_hf(tmp_path / "hf")
    assert cfg.qkv_bias == (family == "qwen2") and cfg.tie_embeddings == overrides["tie_word_embeddings"]
    model = Transformer(cfg).eval()
    model.load_state_dict(state)  # strict: every tensor mapped, nothing left over
    torch.testing.assert_close(model(ids), expected, atol=ATOL, rtol=RTOL)

    out = save_hf(model.state_dict(), cfg, tmp_path / "export")
    reloaded = _reload(out)
    assert type(reloaded).__name__ == ("Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM")
    torch.testing.assert_close(reloaded(ids).logits, expected, atol=ATOL, rtol=RTOL)


def _write_tokenizer(path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, "<s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
         "bos_token": {"content": "<s>", "special": True}, "chat_template": "{{ messages }}"}))


@pytest.mark.parametrize("qkv_bias,tied", [(False, False), (True, True)])
@torch.no_grad()
def test_llmsys_export_loads_in_transformers(tmp_path, qkv_bias, tied):
    cfg = ModelConfig(vocab_size=157, dim=40, n_layers=3, n_heads=5, n_kv_heads=1, ffn_dim=72, max_seq_len=48,
                      tie_embeddings=tied, qkv_bias=qkv_bias)
    torch.manual_seed(3)
    model = Transformer(cfg).eval()
    _perturb(model, seed=4)
    _write_tokenizer(tmp_path / "tok", cfg.vocab_size)
    final = save_pretrained(model.state_dict(), cfg, tmp_path / "final", tokenizer_dir=tmp_path / "tok")

    out = export_hf(final, tmp_path / "hf")
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    hf_config = json.loads((out / "config.json").read_text())
    assert "format" not in hf_config and hf_config["eos_token_id"] == 0 and hf_config["bos_token_id"] == 2
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 2, "eos_token_id": 0, "pad_token_id": 1}
    assert not list(tmp_path.glob("*.tmp"))  # written through a temp dir, then renamed
    ids = _ids(cfg.vocab_size)
    torch.testing.assert_close(_reload(out)(ids).logits, model(ids), atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_init_from_reads_hf_directory(tmp_path):
    _tiny_hf("qwen2").save_pretrained(tmp_path / "hf")
    assert is_hf_checkpoint(tmp_path / "hf")
    cfg = read_config(tmp_path / "hf")  # the calls model.init_from makes in the trainers
    assert cfg == config_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()))
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.hidden_dim, cfg.max_seq_len, cfg.rope_theta) == \
        (48, 2, 6, 2, 88, 64, 5e5)
    state = load_state(tmp_path / "hf", cfg)
    assert set(state) == set(Transformer(cfg).state_dict())

    # import to an llmsys export and back through the command line: the same tensors
    llmsys_dir = import_hf(tmp_path / "hf", tmp_path / "final")
    assert not is_hf_checkpoint(llmsys_dir) and read_config(llmsys_dir) == cfg
    main(["export", str(llmsys_dir), str(tmp_path / "again")])
    cfg2, state2 = load_hf(tmp_path / "again")
    assert cfg2 == cfg
    for name, tensor in state.items():
        torch.testing.assert_close(state2[name], tensor, atol=0, rtol=0)


def _base_config(**overrides) -> dict:
    return {**config_to_hf(ModelConfig(vocab_size=64, dim=32, n_heads=4, n_layers=1, max_seq_len=128)), **overrides}


@pytest.mark.parametrize("overrides,field", [
    (dict(architectures=["GPT2LMHeadModel"]), "architectures: ['GPT2LMHeadModel']"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}), "rope_parameters.rope_type"),
    (dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling.rope_type"),
    (dict(head_dim=16), "head_dim"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(architectures=["MistralForCausalLM"], sliding_window=32), "sliding_window"),
])
def test_unsupported_config_is_refused(tmp_path, overrides, field):
    (tmp_path / "config.json").write_text(json.dumps(_base_config(**overrides)))
    with pytest.raises(ValueError, match=r"config\.json: " + re.escape(field)):
        read_config(tmp_path)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    hf_model = _tiny_hf("llama")
    (tmp_path / "config.json").write_text(hf_model.config.to_json_string())
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    cfg = read_config(tmp_path)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors only"):
        load_state(tmp_path, cfg)


def test_mismatched_shape_is_refused(tmp_path):
    _tiny_hf("llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] += 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' "
                                         r"has shape \(\d+, \d+\), but the config implies"):
        load_hf(tmp_path)


def test_unexpected_tensor_is_refused(tmp_path):
    # Llama with attention_bias has an o_proj bias llmsys cannot hold; a config that hides it still fails.
    _tiny_hf("llama", attention_bias=True).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["attention_bias"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.self_attn\.\w_proj\.bias' has no place"):
        load_hf(tmp_path)


@dataclasses.dataclass
class SmolLM2:
    hf_dir: Path  # a safetensors HF directory with the tokenizer (and its ChatML Jinja template)
    text: str  # a chat prompt rendered by the tokenizer's template
    ids: torch.Tensor  # (1, T) its token ids
    expected: torch.Tensor  # (1, T, V) transformers' fp32 logits of the GGUF model on ids


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory, smollm2_export, smollm2_reference) -> SmolLM2:
    """SmolLM2-135M-Instruct as a Hugging Face directory: the package's GGUF imported by llmsys
    (tests/models/conftest.py) and exported with ``export_hf``; the logits it must give are transformers' own
    of the GGUF."""
    hf_dir = export_hf(smollm2_export, tmp_path_factory.mktemp("smollm2") / "hf")
    ref = smollm2_reference
    return SmolLM2(hf_dir, ref.text, ref.ids, ref.expected)


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_real_model_round_trip(tmp_path, smollm2):
    cfg, state = load_hf(smollm2.hf_dir)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.tie_embeddings) == (576, 30, 9, 3, True)
    model = Transformer(cfg).eval()
    model.load_state_dict(state)
    del state
    torch.testing.assert_close(model(smollm2.ids), smollm2.expected, atol=1e-4, rtol=1e-4)

    out = save_hf(model.state_dict(), cfg, tmp_path / "export", tokenizer_dir=smollm2.hf_dir)
    del model
    assert transformers.AutoTokenizer.from_pretrained(out).encode(smollm2.text) == smollm2.ids[0].tolist()
    torch.testing.assert_close(_reload(out)(smollm2.ids).logits, smollm2.expected, atol=1e-4, rtol=1e-4)


def _chat_rows(n: int) -> list[dict]:
    # One pattern throughout, so a few steps on some rows lower the loss on all of them.
    return [{"prompt": f"What is {a} plus {a + 1}?", "response": f"{a} plus {a + 1} is {2 * a + 1}."}
            for a in range(n)]


@torch.no_grad()
def _mean_sft_loss(model: Transformer, data_cache: str) -> float:
    packed = load_sft_data(data_cache).packed("train")
    batch = packed.collate(list(range(len(packed))))
    return model(**batch).item()


@pytest.mark.slow
def test_smollm2_sft_export_reload(tmp_path, smollm2):
    """The issue's end-to-end path on a real model: a few SFT steps on CPU from the imported HF directory
    (its tokenizer and Jinja chat template included), then export with the CLI and reload in transformers."""
    assert (smollm2.hf_dir / "tokenizer.json").is_file()  # stage=sft takes the tokenizer from init_from
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _chat_rows(16)))
    out = tmp_path / "sft"
    started = time.perf_counter()
    # train() prepends the SMALL model.* overrides; with init_from the architecture comes from the
    # checkpoint (trainers/lm.py), so they do not apply, and data.seq_len is overridden below.
    train(out, ["stage=sft", f"model.init_from={smollm2.hf_dir}", "data=chat", f"data.path={data}",
                "data.seq_len=64", "data.val_fraction=0.125", "trainer.max_steps=3", "trainer.global_batch_size=2",
                "trainer.micro_batch_size=2", "trainer.eval_every=0", "trainer.save_every=0",
                "trainer.log_every=1", "optim.warmup_steps=0", "optim.lr=1e-4"])
    sft_seconds = time.perf_counter() - started
    losses = train_losses(out)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values()), losses

    meta = json.loads((out / "final" / "config.json").read_text())
    assert meta["stage"] == "sft"
    assert json.loads((Path(meta["data_cache"]) / "manifest.json").read_text())["template"] == "hf"
    cfg = read_config(out / "final")
    assert (cfg.dim, cfg.n_layers, cfg.vocab_size, cfg.tie_embeddings) == (576, 30, 49152, True)
    model = Transformer(cfg).eval()
    model.load_state_dict(load_state(out / "final", cfg))
    start_cfg, start_state = load_hf(smollm2.hf_dir)
    start = Transformer(start_cfg).eval()
    start.load_state_dict(start_state)
    del start_state
    assert not torch.equal(model.layers[0].attention.wq.weight, start.layers[0].attention.wq.weight)
    before, after = _mean_sft_loss(start, meta["data_cache"]), _mean_sft_loss(model, meta["data_cache"])
    assert after < before, (before, after)
    del start

    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmsys.models.hf", "export", str(out / "final"), str(tmp_path / "hf")],
                   check=True, capture_output=True, text=True)
    reloaded = _reload(tmp_path / "hf")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").encode(smollm2.text) == \
        smollm2.ids[0].tolist()
    with torch.no_grad():
        expected = model(smollm2.ids)
        torch.testing.assert_close(reloaded(smollm2.ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, smollm2.expected, atol=1e-4, rtol=1e-4)  # the fine-tuned model, not the base
    print(f"SmolLM2 SFT: 3 steps {sft_seconds:.1f}s, export + reload {time.perf_counter() - started:.1f}s; "
          f"train losses {losses}, train-set loss {before:.4f} -> {after:.4f}")
