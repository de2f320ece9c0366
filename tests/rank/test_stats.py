"""``stats``: counts and inter-annotator agreement on hand-worked rankings."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from llmsys.rank.stats import (
    format_stats,
    kendall_tau,
    pairwise_agreement,
    ranking_stats,
)

RESPONSES = ["r0", "r1", "r2", "r3"]


def _rank(item: str, annotator: str | None, ranking: list[int]) -> dict:
    row = {"prompt": f"prompt of {item}", "responses": RESPONSES, "ranking": ranking, "item": item}
    if annotator is not None:
        row["annotator"] = annotator
    return row


def test_tau_and_agreement_by_hand():
    # [0,1,2,3] vs [1,0,2,3]: of the 6 response pairs only (0,1) is ordered differently.
    assert kendall_tau([0, 1, 2, 3], [1, 0, 2, 3]) == pytest.approx((5 - 1) / 6)
    assert pairwise_agreement([0, 1, 2, 3], [1, 0, 2, 3]) == pytest.approx(5 / 6)
    # A reversed ranking disagrees on every pair.
    assert kendall_tau([0, 1, 2, 3], [3, 2, 1, 0]) == -1.0
    assert pairwise_agreement([0, 1, 2, 3], [3, 2, 1, 0]) == 0.0
    # [1,0,2,3] vs [3,2,1,0]: only (0,1) agrees (both put 1 above 0): (1 - 5) / 6.
    assert kendall_tau([1, 0, 2, 3], [3, 2, 1, 0]) == pytest.approx(-4 / 6)
    with pytest.raises(ValueError, match="not permutations"):
        kendall_tau([0, 1, 2], [0, 1, 1])


def test_report_on_a_hand_made_file(tmp_path):
    path = tmp_path / "rankings.jsonl"
    rows = [
        # item A: three annotators. Pairs: (alice, bob) tau 2/3, (alice, carol) -1, (bob, carol) -2/3;
        # agreement 5/6, 0, 1/6; same best: alice/bob no (0 vs 1), alice/carol no, bob/carol no.
        _rank("A", "alice", [0, 1, 2, 3]), _rank("A", "bob", [1, 0, 2, 3]), _rank("A", "carol", [3, 2, 1, 0]),
        # item B: two annotators in full agreement: tau 1, agreement 1, same best.
        _rank("B", "alice", [2, 0, 1, 3]), _rank("B", "bob", [2, 0, 1, 3]),
        # item C: one annotator only (not compared); a duplicate by her (ignored); an unattributed ranking.
        _rank("C", "alice", [0, 1, 2, 3]), _rank("C", "alice", [3, 2, 1, 0]), _rank("C", None, [1, 2, 3, 0]),
        {"prompt": "p", "chosen": "a", "rejected": "b"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"prompt": "torn', encoding="utf-8")
    (tmp_path / "rankings.jsonl.unranked").write_text("".join(json.dumps(r) + "\n" for r in [
        {"action": "skip", "item": "D", "annotator": "bob"},
        {"action": "flag", "item": "E", "annotator": "carol", "reason": "offensive"},
        {"action": "flag", "item": "F", "annotator": "carol", "reason": None},
    ]))
    report = ranking_stats(path)
    assert (report["rankings"], report["items_ranked"], report["annotators"]) == (8, 3, 3)
    assert (report["skips"], report["flags"]) == (1, 2)
    assert (report["duplicates"], report["unattributed_rankings"], report["other_rows"]) == (1, 1, 1)
    assert report["per_annotator"] == {"alice": {"ranked": 3, "skipped": 0, "flagged": 0},
                                       "bob": {"ranked": 2, "skipped": 1, "flagged": 0},
                                       "carol": {"ranked": 1, "skipped": 0, "flagged": 2}}
    assert (report["items_ranked_by_several"], report["annotator_pairs"]) == (2, 4)
    assert report["kendall_tau"] == pytest.approx((2 / 3 - 1 - 2 / 3 + 1) / 4)
    assert report["pairwise_agreement"] == pytest.approx((5 / 6 + 0 + 1 / 6 + 1) / 4)
    assert report["best_agreement"] == pytest.approx(1 / 4)
    assert [f["reason"] for f in report["flagged"]] == ["offensive", None]
    text = format_stats(report)
    assert "8 rankings of 3 items by 3 annotators; 1 skips, 2 flags" in text
    assert "Kendall's tau 0.000" in text and "flagged E by carol: offensive" in text


def test_no_shared_items_means_no_agreement(tmp_path):
    path = tmp_path / "rankings.jsonl"
    path.write_text(json.dumps(_rank("A", "alice", [0, 1, 2, 3])) + "\n")
    report = ranking_stats(path)
    assert report["kendall_tau"] is None and report["annotator_pairs"] == 0
    assert "no item was ranked by more than one person" in format_stats(report)


def test_cli_prints_json_and_fails_clearly(tmp_path):
    path = tmp_path / "rankings.jsonl"
    path.write_text(json.dumps(_rank("A", "alice", [0, 1, 2, 3])) + "\n" + json.dumps(_rank("A", "bob", [0, 1, 3, 2])) + "\n")
    proc = subprocess.run([sys.executable, "-m", "llmsys.rank", "stats", str(path), "--json"], check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert math.isclose(report["kendall_tau"], (5 - 1) / 6) and report["annotator_pairs"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "llmsys.rank", "stats", str(bad)], check=False, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and f"{bad}:1: 'ranking' [0, 0] is not a permutation" in proc.stderr
