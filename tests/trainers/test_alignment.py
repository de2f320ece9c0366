"""The alignment stages end to end on the embedded default (data=prefs): reward model, DPO, PPO.

The session's small pipeline (``pipeline_run`` in tests/conftest.py: pretrain -> sft -> reward -> dpo,
ppo, each a separate ``python -m llmsys.train`` process) provides the runs whose curves are checked
here; the other tests start extra runs from its exports, on 2 processes and under ZeRO-2/3.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import pytest
import torch

from llmsys.models import read_config
from llmsys.models.heads import is_scalar_export
from llmsys.pipeline import STAGES, stage_command
from tests.conftest import PIPELINE_OVERRIDES
from tests.trainers.helpers import metrics, train

PREFS = ["data=prefs", "data.seq_len=128", "trainer.log_every=2", "trainer.global_batch_size=16",
         "trainer.micro_batch_size=8", "optim.warmup_steps=2", "optim.lr=5e-4"]
PPO = ["stage=ppo", "data=prefs", "data.seq_len=96", "trainer.log_every=1", "trainer.global_batch_size=16",
       "trainer.micro_batch_size=8", "ppo.rollout_batch_size=32", "ppo.max_new_tokens=16", "ppo.log_samples=32"]


def rows_with(out, key):
    return [row for row in metrics(out) if key in row]


def rerun_stage(pipeline_run, tmp_path, name: str, *extra: str) -> tuple[object, subprocess.CompletedProcess]:
    """Copy a finished pipeline and rerun one stage's exact command with more steps (it resumes)."""
    out = tmp_path / "pipeline"
    shutil.copytree(pipeline_run, out)
    shutil.rmtree(out / name / "final")
    cmd = stage_command(STAGES[name], out, 1.0, [*PIPELINE_OVERRIDES, *extra], nproc=1)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out / name, proc


@pytest.mark.slow
def test_reward_model_learns_the_rankings(pipeline_run):
    run = pipeline_run / "reward"
    val = rows_with(run, "val_accuracy")
    assert val[0]["step"] == 0 and val[-1]["step"] == 60
    # The annotator's rankings are learnable: far above chance (0.5) on prompts never trained on.
    assert val[-1]["val_accuracy"] > 0.8, val
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.2, val
    assert {"loss", "accuracy", "margin"} <= set(rows_with(run, "accuracy")[-1])
    final = run / "final"
    assert is_scalar_export(final) and not is_scalar_export(pipeline_run / "sft" / "final")
    assert read_config(final).dim == read_config(pipeline_run / "sft" / "final").dim


@pytest.mark.slow
def test_dpo_raises_the_margin_and_the_preferred_behaviour(pipeline_run, tmp_path):
    run = pipeline_run / "dpo"
    val = rows_with(run, "val_reward_accuracy")
    # Before the first step the policy is the reference: DPO loss log 2 (+ the chosen NLL term), rewards 0.
    nll_weight = 1.0  # dpo.nll_weight of the pipeline's DPO stage
    assert any(o == f"dpo.nll_weight={nll_weight}" for o in STAGES["dpo"].overrides)
    assert val[0]["step"] == 0
    assert math.isclose(val[0]["val_loss"] - nll_weight * val[0]["val_chosen_nll"], math.log(2), abs_tol=1e-4)
    assert abs(val[0]["val_reward_margin"]) < 1e-4
    assert val[-1]["val_reward_margin"] > 0.3 and val[-1]["val_reward_accuracy"] > 0.7, val
    assert {"loss", "reward_accuracy", "reward_margin"} <= set(rows_with(run, "reward_accuracy")[-1])
    # What the rankings prefer (the annotator's score of greedy answers to held-out prompts) went up.
    report = json.loads((pipeline_run / "report.json").read_text())["stages"]
    sft, dpo = report["sft"]["probes"]["format_stop"], report["dpo"]["probes"]["format_stop"]
    assert dpo["annotator_score"] > sft["annotator_score"] + 0.1, (sft, dpo)
    ref = torch.load(run / "reference_logps.pt", weights_only=True)
    visited = ~ref["train"].isnan().any(-1)
    assert 0 < int(visited.sum()) <= 40 * 8  # only the pairs this run visits were scored
    assert (ref["train"][visited] < 0).all()
    # Resuming re-reads the cached reference log-probs (the new steps' pairs are added) and continues.
    resumed, proc = rerun_stage(pipeline_run, tmp_path, "dpo", "dpo:trainer.max_steps=44")
    assert "resumed from" in proc.stdout + proc.stderr and "read from" in proc.stdout + proc.stderr
    assert [r["step"] for r in rows_with(resumed, "reward_accuracy")][-1] == 44


@pytest.mark.slow
@pytest.mark.parametrize("stage,zero", [("reward", 2), ("reward", 3), ("dpo", 2), ("dpo", 3)])
def test_preference_stages_on_two_processes(stage, zero, sft_export, tmp_path):
    out = tmp_path / f"{stage}-zero{zero}"
    train(out, [f"stage={stage}", *PREFS, f"model.init_from={sft_export}", f"deepspeed=zero{zero}",
                "trainer.max_steps=6", "trainer.eval_every=6", "trainer.eval_samples=32"],
          nproc=2, launcher="torchrun")
    key = "val_accuracy" if stage == "reward" else "val_reward_accuracy"
    val = rows_with(out, key)
    assert [row["step"] for row in val] == [0, 6]
    assert val[-1]["val_loss"] < val[0]["val_loss"], val  # the same 32 held-out pairs, before and after
    losses = [row["loss"] for row in rows_with(out, "loss") if "val_loss" not in row]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_ppo_raises_the_reward_with_bounded_kl(pipeline_run, tmp_path):
    run = pipeline_run / "ppo"
    rows = rows_with(run, "reward_mean")
    assert [r["step"] for r in rows] == list(range(1, 16))
    for key in ("reward_mean", "kl", "response_length", "policy_loss", "value_loss", "entropy", "clipfrac",
                "generation_time"):
        assert all(math.isfinite(r[key]) for r in rows), key
    first = sum(r["reward_mean"] for r in rows[:3]) / 3
    last = sum(r["reward_mean"] for r in rows[-3:]) / 3
    assert last > first + 0.3, [r["reward_mean"] for r in rows]
    assert max(r["kl"] for r in rows) < 6.0, [r["kl"] for r in rows]  # below the adaptive controller's target
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == set(range(1, 16)) and all(s["response_ids"] for s in samples)
    assert not is_scalar_export(run / "final")
    # The checkpoint reloads: actor, critic, KL controller and reward statistics continue at iteration 15.
    resumed, proc = rerun_stage(pipeline_run, tmp_path, "ppo", "ppo:trainer.max_steps=17")
    assert "at iteration 15" in proc.stdout + proc.stderr
    again = rows_with(resumed, "reward_mean")
    assert [r["step"] for r in again] == list(range(1, 18))
    assert again[15]["kl_coef"] == pytest.approx(rows[-1]["kl_coef"], rel=0.05)  # the adapted beta carried on
    assert again[15]["kl_coef"] != pytest.approx(0.05, abs=1e-9)


@pytest.mark.slow
def test_ppo_generation_under_zero3_matches_zero0(sft_export, pipeline_run, tmp_path):
    """Greedy rollouts of the first iteration (before any update) are the same tokens whether the actor
    is whole (ZeRO-0, one process) or partitioned over 2 processes (ZeRO-3, lockstep decoding)."""
    common = [*PPO, f"model.init_from={sft_export}", f"ppo.reward_model={pipeline_run / 'reward' / 'final'}",
              "trainer.max_steps=1", "ppo.temperature=0", "ppo.ppo_epochs=1"]
    train(tmp_path / "z0", [*common, "deepspeed=zero0"])
    # The partitioned actor also carries LoRA adapters (B = 0 at the start, so the same tokens).
    train(tmp_path / "z3", [*common, "deepspeed=zero3", "model.lora.rank=4"], nproc=2, launcher="torchrun")

    def responses(out):
        return {s["prompt"]: s["response_ids"]
                for s in map(json.loads, (out / "samples.jsonl").read_text().splitlines())}

    whole, sharded = responses(tmp_path / "z0"), responses(tmp_path / "z3")
    assert len(whole) >= 30 and len(sharded) >= 15  # rank 0 of 2 logs its half of the 32 prompts
    assert all(whole[prompt] == ids for prompt, ids in sharded.items())
    assert rows_with(tmp_path / "z3", "generation_time")[0]["generation_time"] > 0
