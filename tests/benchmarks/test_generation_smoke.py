"""benchmarks/generation.py --smoke: llmsys generate vs transformers generate on one exported tiny model, end to
end on the CPU, writing sane JSON rows."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.benchmarks import run_smoke

pytest.importorskip("transformers")

from benchmarks.generation import add_comparisons, match  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 300
STAMP_KEYS = ("device", "torch", "transformers", "python", "date", "git_commit")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("generation")
    rc, output = run_smoke("generation.py", out, RUN_TIMEOUT_S)
    return rc, output, out


def test_generation_smoke(smoke_run):
    rc, output, out = smoke_run
    assert rc == 0, output[-3000:]
    assert "TARGETS: not evaluated" in output  # the target only judges GPU runs; never an exit status
    files = sorted(out.glob("generation-*-smoke.json"))
    assert len(files) == 1, sorted(p.name for p in out.iterdir())
    rows = json.loads(files[0].read_text())
    assert {(r["impl"], r["batch"]) for r in rows} == {
        (i, b) for i in ("transformers", "llmsys", "llmsys_static") for b in (1, 3)}
    for r in rows:
        assert r["subject"] == "generation" and r["status"] == "ok", r
        for key in STAMP_KEYS:
            assert r.get(key), key
        assert r["device"].startswith("cpu") and r["dtype"] == "float32" and r["new_tokens"] == 8
        # Same weights on both sides: the export reproduces our logits (fp32).
        assert r["logits_max_abs_diff"] < 1e-4
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0 and r["ttft_ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 8 / r["seconds"])
        assert 4 * r["batch"] <= r["prompt_tokens"] <= 9 * r["batch"]
    by = {(r["impl"], r["batch"]): r for r in rows}
    for b in (1, 3):
        # The static cache's eager step is decode's own arithmetic: identical tokens, always.
        assert by[("llmsys_static", b)]["greedy_match"] == 1.0
        assert 0.0 <= by[("transformers", b)]["greedy_match"] <= by[("transformers", b)]["greedy_prefix_match"] <= 1
        for impl in ("llmsys", "llmsys_static"):
            ours = by[(impl, b)]
            assert ours["speedup_vs_transformers"] == pytest.approx(
                ours["tokens_per_s"] / by[("transformers", b)]["tokens_per_s"])
        assert "greedy_match" not in by[("llmsys", b)]  # the reference itself


def test_match_counts_whole_sequences_and_prefixes():
    ref = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]])
    got = torch.tensor([[1, 2, 3, 4], [5, 0, 7, 8], [0, 9, 9, 9]])
    m = match(got, ref)
    assert m["greedy_match"] == pytest.approx(1 / 3)
    assert m["greedy_prefix_match"] == pytest.approx((1 + 1 / 4 + 0) / 3)  # first differences at -, 1, 0


def test_speedups_are_ours_over_the_peer():
    rows = [{"impl": "transformers", "status": "ok", "tokens_per_s": 100.0},
            {"impl": "llmsys", "status": "ok", "tokens_per_s": 250.0},
            {"impl": "llmsys_compile", "status": "oom"}]
    add_comparisons(rows, {})
    assert rows[1]["speedup_vs_transformers"] == pytest.approx(2.5)
    assert "speedup_vs_transformers" not in rows[0] and "speedup_vs_transformers" not in rows[2]
