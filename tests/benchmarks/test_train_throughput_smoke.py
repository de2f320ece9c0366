"""benchmarks/train_throughput.py --smoke: a real (tiny) training run timed end to end on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_train_throughput_smoke_writes_a_stamped_row(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (result,) = tmp_path.glob("train_throughput-*-smoke.json")
    (row,) = json.loads(result.read_text())
    assert row["tokens_per_sec"] > 0 and row["steps_timed"] == 5 and row["smoke"] is True
    assert row["flops_per_token"] > 6 * row["params"] // 2  # PaLM: at least 6 N minus the embedding lookup
    assert row["mfu"] is None  # no peak known for a CPU: MFU is not invented
    for key in ("device", "torch", "deepspeed", "date"):
        assert row[key]
