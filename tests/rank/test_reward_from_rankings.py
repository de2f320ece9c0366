"""A rankings file made through the ranking API trains ``stage=reward data=files data.path=...`` directly."""
from __future__ import annotations

import math

import pytest
from fastapi.testclient import TestClient

from llmsys.models.heads import is_scalar_export
from llmsys.rank.app import create_app
from llmsys.rank.store import RankingStore
from tests.rank.conftest import hand_items, read_rows
from tests.trainers.helpers import metrics, train


@pytest.mark.slow
def test_reward_trains_on_a_rankings_file_from_the_page(tiny_export, tmp_path):
    items = hand_items()
    out = tmp_path / "rankings.jsonl"
    store = RankingStore(out)
    client = TestClient(create_app(items, store), base_url="http://127.0.0.1")
    for annotator in ("alice", "bob"):
        while (item := client.get("/api/next", params={"annotator": annotator}).json()["item"]) is not None:
            # alice skips item 1 and flags item 2; the rest are ranked with the longer answers first
            if annotator == "alice" and item["id"] in (items[1].id, items[2].id):
                action = "skip" if item["id"] == items[1].id else "flag"
                body = {"action": action, "reason": "test" if action == "flag" else None}
            else:
                body = {"ranking": sorted(item["shown"], key=lambda i: -len(item["responses"][i]))}
            reply = client.post("/api/submit", json={"annotator": annotator, "item": item["id"], **body})
            assert reply.status_code == 200, reply.text
    store.close()
    rows = read_rows(out)
    assert len(rows) == 2 * len(items) - 2 and len(read_rows(out.with_name("rankings.jsonl.unranked"))) == 2
    run = tmp_path / "reward"
    proc = train(run, ["stage=reward", "data=files", f"data.path={out}", f"model.init_from={tiny_export}",
                       "data.seq_len=96", "trainer.max_steps=4", "trainer.global_batch_size=8",
                       "trainer.micro_batch_size=8", "trainer.log_every=1", "trainer.eval_every=4",
                       "trainer.eval_samples=12"])
    # Every ranking row became its K(K-1)/2 = 6 pairs; the side file of skips and flags was not read.
    assert f"{len(rows)} rows, {len(items)} prompts, {6 * len(rows)} pairs" in proc.stdout + proc.stderr
    lines = metrics(run)
    losses = [row["loss"] for row in lines if "loss" in row and "val_loss" not in row]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), losses
    assert [row["step"] for row in lines if "val_accuracy" in row] == [0, 4]
    assert is_scalar_export(run / "final")
