"""stage=sft end to end: from a pre-trained export, on the embedded chat corpus, 1 and 2 processes."""
from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch

from llmsys.data import load_sft_data
from llmsys.models import Transformer, load_state, read_config
from tests.trainers.helpers import train, train_losses, val_losses

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None,
                       reason="pip install --no-deps chatterbot-corpus (the embedded SFT data)"),
]

SFT = ["stage=sft", "data=chat", "trainer.log_every=1", "trainer.global_batch_size=8", "trainer.micro_batch_size=4",
       "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "base"
    train(out, ["trainer.max_steps=10", "trainer.eval_every=0"])
    return out / "final"


def test_sft_loss_falls_and_export_reloads(tmp_path, base):
    out = tmp_path / "sft"
    train(out, SFT + [f"model.init_from={base}", "trainer.max_steps=30", "trainer.eval_every=15",
                      "trainer.eval_samples=16"])
    val = val_losses(out)
    assert val[30] < val[15] < val[0], val
    meta = json.loads((out / "final" / "config.json").read_text())
    assert meta["stage"] == "sft"
    cfg = read_config(out / "final")
    assert dataclasses.replace(cfg, init_from=None) == read_config(base)  # architecture from the start checkpoint
    model = Transformer(cfg).eval()
    model.load_state_dict(load_state(out / "final", cfg))
    data = load_sft_data(meta["data_cache"])
    packed = data.packed("val")
    batch = packed.collate([0])
    assert int(batch["labels"].ne(-100).sum()) > 0  # assistant tokens only, but some
    with torch.no_grad():
        assert torch.isfinite(model(**batch))


@pytest.fixture(scope="module")
def single_sft_losses(tmp_path_factory, base):
    out = tmp_path_factory.mktemp("sft") / "single"
    train(out, SFT + [f"model.init_from={base}", "trainer.max_steps=5", "trainer.eval_every=0"])
    return train_losses(out)


@pytest.mark.parametrize("stage", [2, 3])
def test_sft_two_processes_match_one(tmp_path, base, single_sft_losses, stage):
    out = tmp_path / f"zero{stage}"
    train(out, SFT + [f"model.init_from={base}", "trainer.max_steps=5", "trainer.eval_every=0",
                      f"deepspeed=zero{stage}"], nproc=2, launcher="torchrun")
    losses = train_losses(out)
    assert sorted(losses) == sorted(single_sft_losses)
    for step, loss in losses.items():
        assert loss == pytest.approx(single_sft_losses[step], rel=1e-4), step


def test_sft_val_loss_does_not_depend_on_the_number_of_processes(tmp_path, base):
    # 15 samples (odd) of different lengths: every one is evaluated once, each token weighs the same.
    common = SFT + [f"model.init_from={base}", "trainer.max_steps=1", "trainer.eval_every=1",
                    "trainer.eval_samples=15"]
    train(tmp_path / "one", common)
    train(tmp_path / "two", common, nproc=2, launcher="torchrun")
    one, two = val_losses(tmp_path / "one"), val_losses(tmp_path / "two")
    assert one[0] == pytest.approx(two[0], rel=2e-6) and one[1] == pytest.approx(two[1], rel=2e-5), (one, two)


def test_sft_without_a_tokenizer_is_refused(tmp_path):
    proc = train(tmp_path / "x", SFT + ["trainer.max_steps=1"], check=False)
    assert proc.returncode != 0 and "stage=sft needs the model's tokenizer" in proc.stderr


# --- LoRA: only the adapters train; the export is the base with the adapters merged in ------------

LORA = ["model.lora.rank=4", "model.lora.alpha=8", "optim.lr=1e-2", "trainer.max_steps=6", "trainer.eval_every=0"]
ATTENTION = ("wq", "wk", "wv", "wo")  # model.lora.targets' default


def _weights(export) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(export / "model.safetensors"))


def _changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()  # no adapter tensors in the export
    return {k for k in before if not torch.equal(before[k], after[k])}


def _targeted(names, targets=ATTENTION) -> set[str]:
    return {k for k in names if k.endswith(".weight") and k.rsplit(".", 2)[-2] in targets}


@pytest.fixture(scope="module")
def lora_sft(tmp_path_factory, base):
    out = tmp_path_factory.mktemp("sft") / "lora"
    train(out, SFT + LORA + [f"model.init_from={base}"])
    return out


def test_lora_sft_changes_only_the_targets_and_exports_a_plain_model(tmp_path, base, lora_sft):
    from llmsys.config import LoRAConfig
    from llmsys.models import export_hf

    losses = train_losses(lora_sft)
    assert losses[6] < losses[1], losses
    before, after = _weights(base), _weights(lora_sft / "final")
    assert _changed(before, after) == _targeted(before)  # every attention matrix, nothing else
    meta = json.loads((lora_sft / "final" / "config.json").read_text())
    assert meta["merged_lora"]["rank"] == 4 and meta["merged_lora"]["targets"] == list(ATTENTION)
    cfg = read_config(lora_sft / "final")
    assert cfg.lora == LoRAConfig()  # a plain model: what init_from, generation and the HF export read
    model = Transformer(cfg).eval()
    model.load_state_dict(load_state(lora_sft / "final", cfg))  # strict: no adapter keys, none missing
    hf = json.loads((export_hf(lora_sft / "final", tmp_path / "hf") / "config.json").read_text())
    assert hf["hidden_size"] == cfg.dim


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_sft_two_processes_match_one(tmp_path, base, lora_sft, stage):
    out = tmp_path / f"lora_zero{stage}"
    train(out, SFT + LORA + [f"model.init_from={base}", f"deepspeed=zero{stage}"], nproc=2, launcher="torchrun")
    losses, single = train_losses(out), train_losses(lora_sft)
    assert sorted(losses) == sorted(single) and losses[6] < losses[1]
    for step, loss in losses.items():
        assert loss == pytest.approx(single[step], rel=1e-4), step
    before, after, single_after = _weights(base), _weights(out / "final"), _weights(lora_sft / "final")
    assert _changed(before, after) == _targeted(before)  # frozen tensors come back bit-identical
    for name in _targeted(before):
        torch.testing.assert_close(after[name], single_after[name], atol=1e-5, rtol=1e-4)
