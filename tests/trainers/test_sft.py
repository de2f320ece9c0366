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


def test_sft_without_a_tokenizer_is_refused(tmp_path):
    proc = train(tmp_path / "x", SFT + ["trainer.max_steps=1"], check=False)
    assert proc.returncode != 0 and "stage=sft needs the model's tokenizer" in proc.stderr
