"""The stage report's pictures: PNG plots of every stage's curves and of the behaviour probes.

One function per figure builds a matplotlib :class:`~matplotlib.figure.Figure` from plain data (the
stages' ``metrics.jsonl`` rows, the report's probe results) and raises :class:`Omitted`, saying why, when
none of what it draws was logged; :func:`write_plots` reads a pipeline directory, draws every figure into
``<out>/plots/<name>.png`` and returns, per figure, its file or the reason it was left out. A run of only
some stages, or a stage that logs other metrics, so loses a figure (or a panel, or a line), never the
report.

==========================  ==================================================================================
file                        what
==========================  ==================================================================================
``loss.png``                train ``loss`` and ``val_loss`` per step, one panel per stage that logs them
``preference_accuracy.png`` the reward model's pairwise accuracy (``accuracy``, ``val_accuracy``) and DPO's
                            implicit-reward accuracy (``reward_accuracy``, ``val_reward_accuracy``) per step
``online_rl.png``           PPO's and GRPO's rollout reward (``reward_mean``) and KL to the reference (``kl``)
                            per iteration
``probes.png``              per stage: the format/stop probe's rates (stopped, well-formed, both) and
                            annotator score, the exact-answer probe's accuracy
==========================  ==================================================================================

Figures are drawn with the Agg canvas directly (no pyplot, no display, no global backend switch) at a fixed
size, and saved without the PNG's software tag, so the same data give the same bytes. Each file is written
to a temporary name and renamed into place; a figure that is left out removes the file an earlier run left.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"  # what every trainer writes into its output directory
PLOTS_DIR = "plots"
PANEL_SIZE = (4.2, 3.2)  # inches per panel
DPI = 100

Rows = Sequence[Mapping[str, Any]]
Curves = Mapping[str, Rows]  # stage -> its metrics rows, in pipeline order
Probes = Mapping[str, Mapping[str, Mapping[str, Any]]]  # stage -> probe name -> the probe's result

# (stage, metric key, label) of the preference-accuracy lines: which accuracy is a preference accuracy
# depends on the stage (GRPO's val_accuracy is an exact-answer rate).
PREFERENCE_SERIES = (("reward", "accuracy", "reward model, train"), ("reward", "val_accuracy", "reward model, val"),
                     ("dpo", "reward_accuracy", "DPO implicit reward, train"),
                     ("dpo", "val_reward_accuracy", "DPO implicit reward, val"))
ONLINE_STAGES = ("ppo", "grpo")
FORMAT_RATES = (("stopped", "stops"), ("well_formed", "well-formed"), ("both", "both"))


class Omitted(Exception):
    """A figure has nothing to draw; the message says what was looked for."""


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``; a line that is not a JSON object is an error naming the file and line."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg}); expected one metrics object per line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: a JSON {type(row).__name__}, expected a metrics object")
        rows.append(row)
    return rows


def series(rows: Rows, key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of the rows that logged ``key`` as a finite number (and a step)."""
    steps, values = [], []
    for row in rows:
        value, step = row.get(key), row.get("step")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and isinstance(step, (int, float)):
            steps.append(float(step))
            values.append(float(value))
    return steps, values


def _figure(panels: int, title: str) -> tuple[Figure, list]:
    fig = Figure(figsize=(PANEL_SIZE[0] * panels, PANEL_SIZE[1] + 0.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0].tolist()
    fig.suptitle(title)
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig, axes


def loss_figure(curves: Curves) -> Figure:
    """Train and validation loss per step, one panel per stage that logged either."""
    drawn = {stage: (series(rows, "loss"), series(rows, "val_loss")) for stage, rows in curves.items()}
    drawn = {stage: lines for stage, lines in drawn.items() if lines[0][0] or lines[1][0]}
    if not drawn:
        raise Omitted("no stage logged loss or val_loss")
    fig, axes = _figure(len(drawn), "Loss per stage")
    for ax, (stage, (train, val)) in zip(axes, drawn.items()):
        if train[0]:
            ax.plot(*train, label="train", linewidth=1.2)
        if val[0]:
            ax.plot(*val, label="val", marker="o", markersize=3, linewidth=1.2)
        ax.set(title=stage, xlabel="step", ylabel="loss")
        ax.legend()
    return fig


def preference_accuracy_figure(curves: Curves) -> Figure:
    """The reward model's and DPO's accuracy at preferring the chosen answer, per step (train and val)."""
    lines = [(key, label, series(curves[stage], key)) for stage, key, label in PREFERENCE_SERIES if stage in curves]
    lines = [(key, label, line) for key, label, line in lines if line[0]]
    if not lines:
        raise Omitted("neither a reward stage (accuracy, val_accuracy) nor a dpo stage (reward_accuracy, "
                      "val_reward_accuracy) logged a preference accuracy")
    fig, (ax,) = _figure(1, "Preference accuracy (chosen over rejected)")
    for key, label, line in lines:
        ax.plot(*line, label=label, marker="o" if key.startswith("val_") else None, markersize=3, linewidth=1.2)
    ax.set(xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02))
    ax.legend()
    return fig


def online_rl_figure(curves: Curves) -> Figure:
    """PPO's and GRPO's rollout reward and KL to the reference per iteration (one line per stage)."""
    stages = {stage: (series(curves[stage], "reward_mean"), series(curves[stage], "kl"))
              for stage in ONLINE_STAGES if stage in curves}
    stages = {stage: lines for stage, lines in stages.items() if lines[0][0] or lines[1][0]}
    if not stages:
        raise Omitted(f"no {' or '.join(ONLINE_STAGES)} stage logged reward_mean or kl")
    fig, (reward_ax, kl_ax) = _figure(2, "Online RL per iteration")
    for stage, (reward, kl) in stages.items():
        if reward[0]:
            reward_ax.plot(*reward, label=stage, linewidth=1.2)
        if kl[0]:
            kl_ax.plot(*kl, label=stage, linewidth=1.2)
    reward_ax.set(title="rollout reward (mean)", xlabel="iteration", ylabel="reward")
    kl_ax.set(title="KL to the reference", xlabel="iteration", ylabel="KL")
    for ax in (reward_ax, kl_ax):
        if ax.lines:
            ax.legend()
    return fig


def probes_figure(probes: Probes) -> Figure:
    """Per stage: the format/stop rates, the annotator score and the exact-answer accuracy, where probed."""
    fmt = {stage: p["format_stop"] for stage, p in probes.items() if "format_stop" in p}
    scored = {stage: r["annotator_score"] for stage, r in fmt.items() if r.get("annotator_score") is not None}
    exact = {stage: p["exact_answer"]["accuracy"] for stage, p in probes.items()
             if p.get("exact_answer", {}).get("accuracy") is not None}
    panels: list[Callable] = []
    if fmt:
        def rates(ax) -> None:
            width = 0.8 / len(FORMAT_RATES)
            for i, (key, label) in enumerate(FORMAT_RATES):
                ax.bar([x + (i - (len(FORMAT_RATES) - 1) / 2) * width for x in range(len(fmt))], [fmt[s].get(key, 0.0) for s in fmt],
                       width, label=label)
            ax.set_xticks(range(len(fmt)), list(fmt))
            ax.set(title="format / stop (held-out chat prompts)", ylabel="rate", ylim=(0, 1.25))
            ax.legend(fontsize="small", loc="upper center", ncols=len(FORMAT_RATES))
        panels.append(rates)
    if scored:
        def annotator(ax) -> None:
            ax.bar_label(ax.bar(range(len(scored)), list(scored.values()), 0.6, color="tab:purple"), fmt="%.2f")
            ax.axhline(0.0, color="black", linewidth=0.8)
            ax.margins(y=0.12)  # room for the value labels
            ax.set_xticks(range(len(scored)), list(scored))
            ax.set(title="annotator score (mean)", ylabel="score")
        panels.append(annotator)
    if exact:
        def accuracy(ax) -> None:
            ax.bar_label(ax.bar(range(len(exact)), list(exact.values()), 0.6, color="tab:green"), fmt="%.2f")
            ax.set_xticks(range(len(exact)), list(exact))
            ax.set(title="exact answers (held-out problems)", ylabel="accuracy", ylim=(0, 1.12))
        panels.append(accuracy)
    if not panels:
        raise Omitted("no stage ran the format_stop or exact_answer probe")
    fig, axes = _figure(len(panels), "Behaviour probes per stage")
    for ax, draw in zip(axes, panels):
        draw(ax)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", metadata={"Software": None})
    os.replace(tmp, path)
    return path


def stage_curves(out: Path, stages: Sequence[str]) -> tuple[dict[str, list[dict]], list[str]]:
    """The metrics rows of each stage's ``<out>/<stage>/metrics.jsonl``, and the stages that have none."""
    curves, missing = {}, []
    for stage in stages:
        path = out / stage / METRICS_FILE
        if path.is_file():
            curves[stage] = read_metrics(path)
        else:
            missing.append(stage)
    return curves, missing


def write_plots(out: Path, report: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Draw every figure of the pipeline directory ``out`` (its stages' metrics, the probes of ``report``, the
    pipeline's report.json object) into ``out/plots/``. Per figure name, in a fixed order: ``{"file":
    "plots/<name>.png", "title": ...}`` (relative to ``out``) or ``{"omitted": why, "title": ...}``."""
    stages = list(report["stages"])
    curves, missing = stage_curves(out, stages)
    probes = {stage: entry.get("probes", {}) for stage, entry in report["stages"].items()}
    figures: list[tuple[str, str, Callable[[], Figure]]] = [
        ("loss", "Loss per stage (train and validation)", lambda: loss_figure(curves)),
        ("preference_accuracy", "Reward model (and DPO) preference accuracy", lambda: preference_accuracy_figure(curves)),
        ("online_rl", "PPO / GRPO reward and KL per iteration", lambda: online_rl_figure(curves)),
        ("probes", "Behaviour probes per stage", lambda: probes_figure(probes)),
    ]
    result = {}
    for name, title, build in figures:
        relative = f"{PLOTS_DIR}/{name}.png"
        try:
            fig = build()
        except Omitted as why:
            reason = str(why)
            if missing and name != "probes":
                reason += f" (no {METRICS_FILE} for {', '.join(missing)})"
            (out / relative).unlink(missing_ok=True)
            result[name] = {"title": title, "omitted": reason}
            continue
        save_png(fig, out / relative)
        result[name] = {"title": title, "file": relative}
    return result
