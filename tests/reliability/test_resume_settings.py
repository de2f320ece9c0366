"""What a resume does with settings that changed since the checkpoint: the optimizer's are applied from the
resumed step on (and logged, and recorded in config.yaml), the data order's and the architecture's are
refused naming the key (see also test_error_catalogue.py), nothing is ignored."""
from __future__ import annotations

import pytest
import yaml

from tests.trainers.helpers import metrics, train

pytestmark = pytest.mark.slow
COMMON = ["stage=pretrain", "trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=2",
          "optim.warmup_steps=0", "optim.schedule=constant"]


def test_a_learning_rate_changed_on_resume_is_applied_logged_and_recorded(tmp_path):
    out = tmp_path / "run"
    train(out, [*COMMON, "trainer.max_steps=4", "optim.lr=1e-3", "optim.weight_decay=0.1"])
    resumed = train(out, [*COMMON, "trainer.max_steps=6", "optim.lr=2e-4", "optim.weight_decay=0.0"])

    lrs = {row["step"]: row["lr"] for row in metrics(out) if "lr" in row}
    assert [lrs[s] for s in (1, 2, 3, 4)] == pytest.approx([1e-3] * 4)
    assert [lrs[s] for s in (5, 6)] == pytest.approx([2e-4] * 2)
    assert "resume: optim.lr: 0.001 -> 0.0002 changed since step_00000004" in resumed.stderr
    assert "optim.weight_decay: 0.1 -> 0.0" in resumed.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["optim"]["lr"] == pytest.approx(2e-4)


def test_an_unchanged_resume_reports_no_change(tmp_path):
    out = tmp_path / "run"
    train(out, [*COMMON, "trainer.max_steps=2"])
    resumed = train(out, [*COMMON, "trainer.max_steps=2"])
    assert "changed since" not in resumed.stderr
