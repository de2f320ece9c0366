"""llmsys.eval.plots: the report's figures from small synthetic metrics files: valid PNGs of the planned size that
draw the logged numbers, and a figure left out, with its reason, when what it draws was not logged."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.image import imread

from llmsys.eval import plots
from llmsys.eval.plots import (
    Omitted,
    loss_figure,
    online_rl_figure,
    preference_accuracy_figure,
    probes_figure,
    read_metrics,
    write_plots,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

CURVES = {
    "pretrain": [{"step": 0, "val_loss": 8.1}, {"step": 10, "loss": 7.0, "lr": 1e-3}, {"step": 20, "loss": 5.5},
                 {"step": 20, "val_loss": 6.2}],
    "reward": [{"step": 0, "val_loss": 0.69, "val_accuracy": 0.5}, {"step": 10, "loss": 0.6, "accuracy": 0.625},
               {"step": 20, "loss": 0.4, "accuracy": 0.75}, {"step": 20, "val_loss": 0.5, "val_accuracy": 0.8}],
    "grpo": [{"step": 0, "val_reward_mean": 0.1, "val_accuracy": 0.1},  # GRPO's val_accuracy: exact answers
             {"step": 1, "reward_mean": 0.2, "kl": 0.0}, {"step": 2, "reward_mean": 0.35, "kl": 0.04},
             {"step": 3, "reward_mean": 0.3, "kl": float("nan")}],
}
PROBES = {
    "pretrain": {"format_stop": {"n": 4, "stopped": 0.0, "well_formed": 1.0, "both": 0.0, "annotator_score": -2.5}},
    "sft": {"format_stop": {"n": 4, "stopped": 0.75, "well_formed": 1.0, "both": 0.75, "annotator_score": -0.3},
            "exact_answer": {"n": 8, "accuracy": 0.125, "stopped": 1.0}},
    "reward": {},
    "grpo": {"exact_answer": {"n": 8, "accuracy": 0.375, "stopped": 1.0}},
}


def _write_run(out: Path, curves=CURVES, probes=PROBES) -> dict:
    """A pipeline directory with the stages' metrics.jsonl; its report.json object."""
    for stage, rows in curves.items():
        (out / stage).mkdir(parents=True, exist_ok=True)
        (out / stage / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"stages": {stage: {"probes": result} for stage, result in probes.items()}}


def _xy(line) -> list[tuple[float, float]]:
    return [tuple(point) for point in line.get_xydata().tolist()]


def test_figures_are_pngs_of_the_planned_size_linked_by_relative_path(tmp_path):
    report = _write_run(tmp_path)
    result = write_plots(tmp_path, report)
    assert list(result) == ["loss", "preference_accuracy", "online_rl", "probes"]
    panels = {"loss": 2, "preference_accuracy": 1, "online_rl": 2, "probes": 3}  # loss: pretrain, reward
    for name, entry in result.items():
        assert entry["file"] == f"plots/{name}.png" and entry["title"]
        path = tmp_path / entry["file"]
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        height, width = imread(path).shape[:2]
        assert (width, height) == (round(plots.PANEL_SIZE[0] * panels[name] * plots.DPI),
                                   round((plots.PANEL_SIZE[1] + 0.4) * plots.DPI)), name
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(f"{n}.png" for n in panels)
    # The same data draw the same bytes (no timestamp or version in the file).
    first = (tmp_path / "plots" / "probes.png").read_bytes()
    write_plots(tmp_path, report)
    assert (tmp_path / "plots" / "probes.png").read_bytes() == first


def test_figures_draw_the_logged_numbers():
    pretrain, _ = loss_figure(CURVES).axes
    assert pretrain.get_title() == "pretrain"
    assert [_xy(line) for line in pretrain.lines] == [[(10, 7.0), (20, 5.5)], [(0, 8.1), (20, 6.2)]]
    (ax,) = preference_accuracy_figure(CURVES).axes  # the reward model's, not GRPO's val_accuracy
    assert [line.get_label() for line in ax.lines] == ["reward model, train", "reward model, val"]
    assert [_xy(line) for line in ax.lines] == [[(10, 0.625), (20, 0.75)], [(0, 0.5), (20, 0.8)]]
    reward_ax, kl_ax = online_rl_figure(CURVES).axes
    assert [_xy(line) for line in reward_ax.lines] == [[(1, 0.2), (2, 0.35), (3, 0.3)]]
    assert [_xy(line) for line in kl_ax.lines] == [[(1, 0.0), (2, 0.04)]]  # the NaN is left out
    rates, annotator, exact = probes_figure(PROBES).axes
    heights = [bar.get_height() for bar in rates.patches]  # per rate (stops, well-formed, both), per stage
    assert heights == [0.0, 0.75, 1.0, 1.0, 0.0, 0.75]
    assert [t.get_text() for t in rates.get_xticklabels()] == ["pretrain", "sft"]
    assert [bar.get_height() for bar in annotator.patches] == [-2.5, -0.3]
    assert [bar.get_height() for bar in exact.patches] == [0.125, 0.375]
    assert [t.get_text() for t in exact.get_xticklabels()] == ["sft", "grpo"]


def test_a_figure_whose_metrics_are_missing_is_left_out_with_its_reason(tmp_path):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "online_rl.png").write_bytes(b"an earlier run's")
    curves = {"pretrain": CURVES["pretrain"]}
    report = _write_run(tmp_path, curves, {"pretrain": PROBES["pretrain"], "sft": PROBES["sft"]})
    result = write_plots(tmp_path, report)
    assert result["loss"]["file"] == "plots/loss.png" and result["probes"]["file"] == "plots/probes.png"
    assert result["online_rl"] == {"title": result["online_rl"]["title"], "omitted": (
        "no ppo or grpo stage logged reward_mean or kl (no metrics.jsonl for sft)")}
    assert result["preference_accuracy"]["omitted"].startswith("neither a reward stage (accuracy, val_accuracy)")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["loss.png", "probes.png"]  # stale one gone
    with pytest.raises(Omitted, match="no stage ran the format_stop or exact_answer probe"):
        probes_figure({"reward": {}})
    with pytest.raises(Omitted, match="no stage logged loss or val_loss"):
        loss_figure({"ppo": [{"step": 1, "reward_mean": 1.0}]})


def test_a_bad_metrics_line_names_its_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": \n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: not JSON"):
        read_metrics(path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: a JSON list, expected a metrics object"):
        read_metrics(path)
