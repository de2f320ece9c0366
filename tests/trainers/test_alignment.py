"""The alignment stages end to end on the embedded default (data=prefs): reward model, DPO, PPO.

Every stage starts from the session's small pretrain -> SFT chain (``sft_export`` in tests/conftest.py)
and runs as users run it: ``python -m llmsys.train stage=...`` in separate processes.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from llmsys.models import read_config
from llmsys.models.heads import is_scalar_export
from tests.trainers.helpers import metrics, train

PREFS = ["data=prefs", "data.seq_len=128", "model.max_seq_len=128", "trainer.log_every=5",
         "optim.warmup_steps=5", "trainer.global_batch_size=16", "trainer.micro_batch_size=8"]


def rows_with(out, key):
    return [row for row in metrics(out) if key in row]


@pytest.fixture(scope="module")
def reward_export(sft_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("reward")
    train(out, ["stage=reward", *PREFS, f"model.init_from={sft_export}", "trainer.max_steps=60",
                "trainer.eval_every=30", "optim.lr=5e-4"])
    return out


@pytest.mark.slow
def test_reward_model_learns_the_rankings(reward_export, sft_export):
    val = rows_with(reward_export, "val_accuracy")
    assert val[0]["step"] == 0 and val[-1]["step"] == 60
    # The annotator's rankings are learnable: well above chance (0.5) on prompts never trained on.
    assert val[-1]["val_accuracy"] > 0.8, val
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.2, val
    train_rows = rows_with(reward_export, "accuracy")
    assert {"loss", "accuracy", "margin"} <= set(train_rows[-1])
    final = reward_export / "final"
    assert is_scalar_export(final) and not is_scalar_export(sft_export)
    assert read_config(final).dim == read_config(sft_export).dim


@pytest.mark.slow
def test_dpo_raises_the_chosen_rejected_margin(sft_export, tmp_path):
    out = tmp_path / "dpo"
    train(out, ["stage=dpo", *PREFS, f"model.init_from={sft_export}", "trainer.max_steps=20",
                "trainer.eval_every=20", "trainer.eval_samples=64", "optim.lr=5e-4", "dpo.beta=0.1"])
    val = rows_with(out, "val_reward_accuracy")
    # Before the first step the policy is the reference: loss log 2, implicit rewards 0.
    assert val[0]["step"] == 0 and math.isclose(val[0]["val_loss"], math.log(2), abs_tol=1e-4)
    assert abs(val[0]["val_reward_margin"]) < 1e-4
    assert val[-1]["val_reward_margin"] > 0.5 and val[-1]["val_reward_accuracy"] > 0.7, val
    train_rows = rows_with(out, "reward_accuracy")
    assert {"loss", "reward_accuracy", "reward_margin"} <= set(train_rows[-1])
    ref = torch.load(out / "reference_logps.pt", weights_only=True)
    visited = ~ref["train"].isnan().any(-1)
    assert 0 < int(visited.sum()) <= 20 * 16  # only the pairs this run visits were scored
    assert (ref["train"][visited] < 0).all()
    # A resumed run re-reads the cached reference log-probs instead of recomputing them.
    proc = train(out, ["stage=dpo", *PREFS, f"model.init_from={sft_export}", "trainer.max_steps=25",
                       "trainer.eval_every=0", "optim.lr=5e-4", "dpo.beta=0.1"])
    assert "read from" in proc.stdout + proc.stderr
    assert rows_with(out, "reward_accuracy")[-1]["step"] == 25


@pytest.mark.slow
@pytest.mark.parametrize("stage,zero", [("reward", 2), ("reward", 3), ("dpo", 2), ("dpo", 3)])
def test_preference_stages_on_two_processes(stage, zero, sft_export, tmp_path):
    out = tmp_path / f"{stage}-zero{zero}"
    train(out, [f"stage={stage}", *PREFS, f"model.init_from={sft_export}", f"deepspeed=zero{zero}",
                "trainer.max_steps=6", "trainer.eval_every=6", "trainer.eval_samples=32", "trainer.log_every=2",
                "optim.lr=5e-4"], nproc=2, launcher="torchrun")
    key = "val_accuracy" if stage == "reward" else "val_reward_accuracy"
    val = rows_with(out, key)
    assert [row["step"] for row in val] == [0, 6]
    losses = [row["loss"] for row in rows_with(out, "loss") if "val_loss" not in row]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert (out / "final" / "model.safetensors").is_file()


PPO = ["stage=ppo", "data=prefs", "data.seq_len=96", "model.max_seq_len=128", "trainer.log_every=1",
       "trainer.global_batch_size=16", "trainer.micro_batch_size=8", "ppo.rollout_batch_size=32",
       "ppo.max_new_tokens=24", "optim.warmup_steps=2", "ppo.log_samples=32"]


@pytest.mark.slow
def test_ppo_raises_the_reward_with_bounded_kl(sft_export, reward_export, tmp_path):
    out = tmp_path / "ppo"
    train(out, [*PPO, f"model.init_from={sft_export}", f"ppo.reward_model={reward_export / 'final'}",
                "trainer.max_steps=12", "optim.lr=3e-4", "ppo.kl_target=6.0", "ppo.adaptive_kl=true",
                "trainer.save_every=6"])
    rows = rows_with(out, "reward_mean")
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("reward_mean", "kl", "response_length", "policy_loss", "value_loss", "entropy", "clipfrac",
                "generation_time"):
        assert all(math.isfinite(r[key]) for r in rows), key
    first = sum(r["reward_mean"] for r in rows[:3]) / 3
    last = sum(r["reward_mean"] for r in rows[-3:]) / 3
    assert last > first + 0.3, [r["reward_mean"] for r in rows]
    assert max(r["kl"] for r in rows) < 6.0, [r["kl"] for r in rows]  # below the controller's target
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == set(range(1, 13)) and all(s["response_ids"] for s in samples)
    assert (out / "final" / "model.safetensors").is_file() and not is_scalar_export(out / "final")
    assert (out / "checkpoints" / "critic" / "latest").is_file()


@pytest.mark.slow
def test_ppo_generation_under_zero3_matches_zero0(sft_export, reward_export, tmp_path):
    """Greedy rollouts of the first iteration (before any update) are the same tokens whether the actor
    is whole (ZeRO-0, one process) or partitioned over 2 processes (ZeRO-3, lockstep decoding)."""
    common = [*PPO, f"model.init_from={sft_export}", f"ppo.reward_model={reward_export / 'final'}",
              "trainer.max_steps=1", "ppo.temperature=0", "ppo.ppo_epochs=1"]
    train(tmp_path / "z0", [*common, "deepspeed=zero0"])
    train(tmp_path / "z3", [*common, "deepspeed=zero3"], nproc=2, launcher="torchrun")

    def responses(out):
        return {s["prompt"]: s["response_ids"]
                for s in map(json.loads, (out / "samples.jsonl").read_text().splitlines())}

    whole, sharded = responses(tmp_path / "z0"), responses(tmp_path / "z3")
    assert len(whole) >= 30 and len(sharded) >= 15  # rank 0 of 2 logs its half of the 32 prompts
    assert all(whole[prompt] == ids for prompt, ids in sharded.items())
    assert rows_with(tmp_path / "z3", "generation_time")[0]["generation_time"] > 0
