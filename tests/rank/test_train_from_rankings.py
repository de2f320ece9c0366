"""A rankings file made through the ranking API trains every stage the README names on it, as written there:
``stage=reward``, ``stage=dpo`` and ``stage=ppo`` with ``data=files data.path=rankings.jsonl`` (plus small sizes).

One rankings file serves the module: two annotators rank every item, except that alice flags one and both
skip another, so that item's prompt is only in the side file ``rankings.jsonl.unranked``. A stage that read
the side file would fail (its rows have no ranking) or, for PPO's prompt reader, gain that prompt.
"""
from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from llmsys.config.schema import DataConfig
from llmsys.data import load_prompts
from llmsys.eval.probes import load_export
from llmsys.models.heads import is_scalar_export
from llmsys.rank.app import create_app
from llmsys.rank.store import RankingStore
from tests.rank.conftest import hand_items, read_rows
from tests.trainers.helpers import metrics, train

SEQ_LEN = 96  # data.seq_len of every run: prompt and answer fit the tiny export's 128 positions
PAIRS_PER_ROW = 6  # K(K-1)/2 for the K = 4 answers of hand_items()


def _skipped_by(annotator: str, index: int) -> str | None:
    """The decision other than a ranking that ``annotator`` makes on item ``index``, if any."""
    if index == 1:
        return "skip"
    return "flag" if annotator == "alice" and index == 2 else None


@pytest.fixture(scope="module")
def rankings(tmp_path_factory) -> Path:
    """``rankings.jsonl`` written through the API, the longer answers ranked first (see the module docstring)."""
    items = hand_items()
    index = {item.id: i for i, item in enumerate(items)}
    out = tmp_path_factory.mktemp("rankings") / "rankings.jsonl"
    store = RankingStore(out)
    client = TestClient(create_app(items, store), base_url="http://127.0.0.1")
    for annotator in ("alice", "bob"):
        while (item := client.get("/api/next", params={"annotator": annotator}).json()["item"]) is not None:
            if (action := _skipped_by(annotator, index[item["id"]])) is not None:
                body = {"action": action, "reason": "test" if action == "flag" else None}
            else:
                body = {"ranking": sorted(item["shown"], key=lambda i: -len(item["responses"][i]))}
            reply = client.post("/api/submit", json={"annotator": annotator, "item": item["id"], **body})
            assert reply.status_code == 200, reply.text
    store.close()
    return out


def _ranked_prompts(rankings: Path) -> set[str]:
    return {row["prompt"] for row in read_rows(rankings)}


def _pairs_line(rankings: Path) -> str:
    """What the preference reader logs when it read the ranked rows and nothing else."""
    rows = read_rows(rankings)
    return f"{len(rows)} rows, {len(_ranked_prompts(rankings))} prompts, {PAIRS_PER_ROW * len(rows)} pairs"


def _output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def _weights_moved(export: Path, start: Path) -> float:
    """The largest change of any weight between the ``start`` export and ``export`` (both reloaded)."""
    trained, initial = load_export(export)[0].state_dict(), load_export(start)[0].state_dict()
    assert trained.keys() == initial.keys()
    return max((trained[name] - initial[name]).abs().max().item() for name in trained)


@pytest.fixture(scope="module")
def reward_run(rankings, tiny_export, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run = tmp_path_factory.mktemp("reward") / "run"
    proc = train(run, ["stage=reward", "data=files", f"data.path={rankings}", f"model.init_from={tiny_export}",
                       f"data.seq_len={SEQ_LEN}", "trainer.max_steps=4", "trainer.global_batch_size=8",
                       "trainer.micro_batch_size=8", "trainer.log_every=1", "trainer.eval_every=4",
                       "trainer.eval_samples=12"])
    return run, proc


def test_the_rankings_file_holds_the_rankings_and_its_side_file_the_rest(rankings):
    items, rows = hand_items(), read_rows(rankings)
    unranked = read_rows(rankings.with_name("rankings.jsonl.unranked"))
    assert len(rows) == 2 * len(items) - 3
    assert sorted(row["action"] for row in unranked) == ["flag", "skip", "skip"]
    only_skipped = items[1].prompt
    assert only_skipped in {row["prompt"] for row in unranked} and only_skipped not in _ranked_prompts(rankings)


@pytest.mark.slow
def test_reward_trains_on_a_rankings_file_from_the_page(rankings, reward_run):
    run, proc = reward_run
    # Every ranking row became its K(K-1)/2 pairs; the side file of skips and flags was not read.
    assert _pairs_line(rankings) in _output(proc)
    lines = metrics(run)
    losses = [row["loss"] for row in lines if "loss" in row and "val_loss" not in row]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), losses
    assert [row["step"] for row in lines if "val_accuracy" in row] == [0, 4]
    assert is_scalar_export(run / "final")


@pytest.mark.slow
def test_dpo_trains_on_a_rankings_file_from_the_page(rankings, tiny_export, tmp_path):
    run = tmp_path / "dpo"
    proc = train(run, ["stage=dpo", "data=files", f"data.path={rankings}", f"model.init_from={tiny_export}",
                       f"data.seq_len={SEQ_LEN}", "trainer.max_steps=3", "trainer.global_batch_size=8",
                       "trainer.micro_batch_size=8", "trainer.log_every=1", "trainer.eval_every=3"])
    assert _pairs_line(rankings) in _output(proc)
    lines = metrics(run)
    steps = [row for row in lines if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3]
    assert all(math.isfinite(row[key]) for row in steps for key in ("loss", "reward_margin")), steps
    assert [row["step"] for row in lines if "val_loss" in row] == [0, 3]
    assert _weights_moved(run / "final", tiny_export) > 0


@pytest.mark.slow
def test_ppo_trains_on_a_rankings_file_from_the_page(rankings, tiny_export, reward_run, tmp_path):
    run = tmp_path / "ppo"
    proc = train(run, ["stage=ppo", "data=files", f"data.path={rankings}", f"model.init_from={tiny_export}",
                       f"ppo.reward_model={reward_run[0] / 'final'}", f"data.seq_len={SEQ_LEN}",
                       "trainer.max_steps=2", "trainer.global_batch_size=4", "trainer.micro_batch_size=4",
                       "ppo.rollout_batch_size=4", "ppo.max_new_tokens=8", "ppo.log_samples=4",
                       "trainer.log_every=1"])
    # PPO draws from each ranked prompt once, however many rows rank it, and from none of the side file.
    prompts = load_prompts(DataConfig(path=str(rankings), seq_len=SEQ_LEN), load_export(tiny_export)[1])
    assert set(prompts.train_texts + prompts.val_texts) == _ranked_prompts(rankings)
    assert len(prompts.train_texts + prompts.val_texts) == len(_ranked_prompts(rankings))
    assert f"ppo: {len(prompts.train)} train prompts," in _output(proc), _output(proc)[-2000:]
    assert {row["prompt"] for row in read_rows(run / "samples.jsonl")} <= set(prompts.train_texts)
    lines = metrics(run)
    assert [row["step"] for row in lines] == [1, 2]
    keys = ("reward_mean", "policy_loss", "value_loss", "kl")
    assert all(math.isfinite(row[key]) for row in lines for key in keys), lines
    assert _weights_moved(run / "final", tiny_export) > 0
