"""Metrics logging (JSONL, resume truncation, wandb offline) and the throughput/MFU meter."""
from __future__ import annotations

import json

import pytest
import torch

from llmsys.config import LoggerConfig
from llmsys.trainers.observe import MetricsLogger, Throughput, device_peak_tflops


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_rows_and_resume_truncation(tmp_path):
    log = MetricsLogger(tmp_path, LoggerConfig(progress=False), enabled=True, total_steps=10, start_step=0,
                        run_config={})
    for step in range(1, 7):
        log.log({"step": step, "loss": 1.0 / step, "lr": 1e-3, "tokens_per_sec": 10.0, "mfu": None}, echo=False)
    log.log({"step": 6, "val_loss": 0.5}, echo=False)
    log.close()
    rows = _rows(tmp_path / "metrics.jsonl")
    assert len(rows) == 7 and "mfu" not in rows[0]  # None values are left out, not written as null
    # Resuming from the step-4 checkpoint drops what the crashed run logged after it.
    MetricsLogger(tmp_path, LoggerConfig(progress=False), enabled=True, total_steps=10, start_step=4,
                  run_config={}).close()
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    # A fresh start (step 0) in a directory with old metrics starts a new file.
    MetricsLogger(tmp_path, LoggerConfig(progress=False), enabled=True, total_steps=10, start_step=0,
                  run_config={}).close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_non_main_ranks_write_nothing(tmp_path):
    log = MetricsLogger(tmp_path, LoggerConfig(progress=False), enabled=False, total_steps=1, start_step=0,
                        run_config={})
    log.log({"step": 1, "loss": 1.0})
    assert list(tmp_path.iterdir()) == []


def test_wandb_offline_run_is_written_in_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log = MetricsLogger(tmp_path, LoggerConfig(progress=False, wandb=True, wandb_mode="offline"), enabled=True,
                        total_steps=2, start_step=0, run_config={"optim": {"lr": 1e-3}})
    log.log({"step": 1, "loss": 2.0}, echo=False)
    log.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_throughput_and_mfu():
    meter = Throughput(flops_per_token=1000, peak_tflops=1e-6, world_size=2)  # peak: 1e6 FLOP/s per device
    meter.start()
    meter.seconds = 0.0
    meter._start -= 2.0  # pretend two seconds passed
    meter.stop(tokens=4000)
    report = meter.report()
    assert report["tokens_per_sec"] == pytest.approx(2000, rel=1e-3)
    assert report["tokens_per_sec_per_device"] == pytest.approx(1000, rel=1e-3)
    assert report["mfu"] == pytest.approx(2000 * 1000 / (1e6 * 2), rel=1e-3)
    assert meter.report()["tokens_per_sec"] == 0.0  # the interval restarts after each report
    assert device_peak_tflops(torch.device("cpu"), None) is None
    assert device_peak_tflops(torch.device("cpu"), 3.5) == 3.5
