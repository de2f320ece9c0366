"""A real diverging run (``optim.lr=1e6``): it stops non-zero with a diagnostic, its metrics stay JSON, and
no checkpoint or export is written from non-finite weights, nor are the good checkpoints pruned."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from llmsys.train import EXIT_NON_FINITE
from llmsys.trainers.observe import METRICS_FILE
from tests.trainers.helpers import train


def _strict_json(line: str) -> dict:
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(line, parse_constant=refuse)


def _checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    (states,) = ckpt.glob("*model_states.pt")
    return torch.load(states, map_location="cpu", weights_only=True)["module"]


@pytest.mark.slow
def test_a_diverging_run_stops_with_a_diagnostic_and_writes_nothing_non_finite(tmp_path):
    out = tmp_path / "run"
    proc = train(out, ["stage=pretrain", "trainer.max_steps=12", "trainer.log_every=1", "trainer.save_every=1",
                       "trainer.keep_checkpoints=2", "trainer.eval_every=0", "optim.lr=1e6",
                       "optim.warmup_steps=0"], check=False)
    assert proc.returncode == EXIT_NON_FINITE, proc.stderr[-3000:]
    rows = [_strict_json(line) for line in (out / METRICS_FILE).read_text().splitlines() if line.strip()]
    first_bad = min(row["step"] for row in rows if "skipped_steps" in row)
    stop = re.search(r"step (\d+): 3 non-finite steps in a row \(trainer.max_bad_steps=3\), loss \S+, .*"
                     r"last good checkpoint: (\S+)", proc.stderr)
    assert stop, proc.stderr[-3000:]
    assert int(stop.group(1)) == first_bad + 2 < 12  # stopped at the third bad step, long before the end
    assert not (out / "final").exists()

    ckpts = sorted((out / "checkpoints").glob("step_*"))
    good = out / "checkpoints" / f"step_{first_bad - 1:08d}"
    assert Path(stop.group(2)) == good and ckpts[-1] == good  # the last good one is named and kept
    assert (out / "checkpoints" / "latest").read_text().strip() == good.name
    assert len(ckpts) == 2 and all(int(c.name[5:]) < first_bad for c in ckpts)
    for ckpt in ckpts:
        weights = _checkpoint_weights(ckpt)
        assert weights and all(torch.isfinite(w).all() for w in weights.values()), ckpt
