"""benchmarks/peers.py: the plain loop computes llmsys's loss, and ``--smoke`` measures the same work on every side."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import peers  # noqa: E402
from llmsys.config import ModelConfig  # noqa: E402
from llmsys.models import Transformer  # noqa: E402
from tests.tools import missing_tool  # noqa: E402

HAS_TRL = importlib.util.find_spec("trl") is not None


class _Rows:
    """Packed rows as ``PackedSFT`` serves them: ``rows[r]`` example indices, ``examples[e]`` (ids, labels)."""

    def __init__(self, lengths: list[list[int]], vocab: int):
        self.rows, self.data = [], []
        for row in lengths:
            self.rows.append(list(range(len(self.data), len(self.data) + len(row))))
            for n in row:
                ids = torch.randint(0, vocab, (n,))
                labels = torch.where(torch.rand(n) < 0.7, torch.roll(ids, -1), torch.full((n,), -100))
                labels[-1] = -100
                self.data.append((ids, labels))
        self.examples = self.data


def test_plain_rows_loss_equals_llmsys_packed_loss():
    """The plain loop's (rows, seq_len) batch with per-row masks trains exactly what llmsys's packed sequence does."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=97, max_seq_len=29)
    model = Transformer(cfg)
    rows = _Rows([[7, 13, 5], [29], [3, 11, 2, 6]], cfg.vocab_size)
    batch = peers._rows_batch(rows, [0, 1, 2], cfg.max_seq_len)
    examples = [rows.examples[e] for r in range(3) for e in rows.rows[r]]
    lengths = torch.tensor([len(ids) for ids, _ in examples])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int32), torch.cumsum(lengths, 0).int()])
    packed = model(torch.cat([i for i, _ in examples])[None], labels=torch.cat([lab for _, lab in examples])[None],
                   cu_seqlens=cu_seqlens)
    plain = peers._rows_loss(model, batch)
    torch.testing.assert_close(plain, packed, rtol=1e-5, atol=1e-6)
    assert batch["input_ids"].shape == (3, cfg.max_seq_len)
    assert int((batch["labels"] != -100).sum()) == sum(int((lab != -100).sum()) for _, lab in examples)
    # Row 0: the second example (positions 7..19) restarts RoPE and sees neither the first nor the third.
    assert batch["positions"][0, 7] == 0 and not batch["mask"][0, 0, 8, 6] and batch["mask"][0, 0, 8, 7]


def test_summarise_leaves_out_the_warmup_steps():
    row = peers.summarise({"step_seconds": [9.0, 1.0, 3.0], "step_tokens": [5, 100, 300]}, warmup=1)
    assert row["tokens_per_sec"] == pytest.approx(400 / 4.0) and row["steps_timed"] == 2


@pytest.mark.slow
def test_peers_smoke_runs_the_same_work_on_every_side(tmp_path):
    if not HAS_TRL:
        missing_tool("needs trl (the peer): pip install -e '.[bench]'")
    impls = ["plain", "llmsys", "trl"]
    env = dict(os.environ, OUT=str(tmp_path), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "benchmarks/peers.py", "--smoke", "--impls", ",".join(impls)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("TARGET ") == 2  # printed, never the exit status
    (result,) = tmp_path.glob("peers-*-smoke.json")
    rows = json.loads(result.read_text())
    rounds = {(r["stage"], r["impl"]): r for r in rows if r["kind"] == "round"}
    medians = {(r["stage"], r["impl"]): r for r in rows if r["kind"] == "median"}
    # GRPO has no plain loop (the loop does not generate).
    expected = {(s, i) for s in ("sft", "dpo") for i in impls} | {("grpo", i) for i in impls if i != "plain"}
    assert set(rounds) == set(medians) == expected
    for (stage, impl), row in rounds.items():
        assert row["tokens_per_sec"] > 0 and row["steps_timed"] == 3, row
        for key in ("device", "torch", "deepspeed", "date", "git_commit"):
            assert key in row
        for peer in impls:
            if peer != impl and (stage, peer) in rounds:
                assert row[f"ratio_vs_{peer}"] == pytest.approx(row["tokens_per_sec"] / rounds[stage, peer]["tokens_per_sec"])
    for stage in ("sft", "dpo"):
        plain, ours = rounds[stage, "plain"], rounds[stage, "llmsys"]
        assert plain["tokens_timed"] == ours["tokens_timed"]  # the same rows / pairs, counted the same way
        assert set(plain["phase_seconds"]) == {"collate", "forward", "backward", "optimizer"}
        if stage == "dpo":
            assert rounds[stage, "trl"]["tokens_timed"] == ours["tokens_timed"]
    # llmsys's own meter counts the packed SFT tokens as they are, and the padded 2B x T of DPO.
    assert rounds["sft", "llmsys"]["llmsys_counted_tokens"] == rounds["sft", "llmsys"]["tokens_timed"]
    assert rounds["dpo", "llmsys"]["llmsys_counted_tokens"] > rounds["dpo", "llmsys"]["tokens_timed"]
    assert medians["sft", "llmsys"]["targets"][0]["need"] == 0.9
