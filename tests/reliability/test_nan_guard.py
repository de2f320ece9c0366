"""The numerical guard: a non-finite step is skipped without touching the optimizer, counted, and a streak
of them ends the run with a diagnostic before anything is written from non-finite weights."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from unittest import mock

import pytest
import torch

from llmsys.config import DeepSpeedConfig, LoggerConfig, ModelConfig, OptimConfig, TrainerConfig
from llmsys.models import Transformer
from llmsys.trainers.components import NonFiniteError, NumericalGuard, check_finite_weights
from llmsys.trainers.observe import METRICS_FILE, MetricsLogger

MODEL = ModelConfig(vocab_size=61, dim=32, n_layers=1, n_heads=4, ffn_dim=64, max_seq_len=32)


def _strict_json(line: str) -> dict:
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(line, parse_constant=refuse)


@pytest.fixture(scope="module")
def dist():
    """One single-process group for this module (DeepSpeed does not take a second one in a process well).
    Its env vars (RANK, MASTER_PORT, ...) are undone afterwards: the real runs live in test_nan_run.py so
    that no training process inherits them. So is ``torch.nn.functional.linear``, which building a ZeRO-3
    engine replaces with DeepSpeed's own for the rest of the process (the autograd graphs that later tests
    inspect would change)."""
    from llmsys.distributed import init_distributed, shutdown

    with mock.patch.dict(os.environ), mock.patch.object(torch.nn.functional, "linear", torch.nn.functional.linear):
        info = init_distributed(DeepSpeedConfig(stage=0))
        try:
            yield info
        finally:
            shutdown(info)


def _optimizer_state(engine) -> list[torch.Tensor]:
    """Every tensor the wrapped torch optimizer holds (moments, step counts), copied."""
    inner = getattr(engine.engine.optimizer, "optimizer", engine.engine.optimizer)
    return [v.detach().clone() for state in inner.state.values() for v in state.values()
            if isinstance(v, torch.Tensor)]


def _weights(engine) -> list[torch.Tensor]:
    return [getattr(p, "ds_tensor", p).detach().clone() for p in engine.module.parameters()]


def _step(engine, ids: torch.Tensor, poison: bool) -> None:
    for mb in ids.split(2):  # two micro-batches per optimizer step
        loss = engine(mb, labels=mb)
        engine.backward(loss * float("nan") if poison else loss)
        engine.step()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_single_non_finite_step_is_skipped_counted_and_leaves_the_optimizer_untouched(dist, stage):
    from llmsys.distributed import Engine

    trainer = TrainerConfig(global_batch_size=4, micro_batch_size=2, max_steps=10)
    torch.manual_seed(0)
    engine = Engine(lambda: Transformer(MODEL), ds=DeepSpeedConfig(stage=stage),
                    optim=OptimConfig(lr=1e-2, warmup_steps=0), trainer=trainer, dist=dist, max_steps=10)
    ids = torch.randint(0, MODEL.vocab_size, (4, 9))

    _step(engine, ids, poison=False)
    assert not engine.last_step_skipped and engine.skipped_steps == 0
    weights, state, lr = _weights(engine), _optimizer_state(engine), engine.lr
    assert state, "the optimizer holds state after a good step"

    _step(engine, ids, poison=True)  # NaN loss (and NaN gradients) on the second micro-batch only
    assert engine.last_step_skipped and engine.skipped_steps == 1
    for before, after in zip(weights, _weights(engine)):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    for before, after in zip(state, _optimizer_state(engine)):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert engine.lr != lr  # the schedule follows the trainer step, skipped or not

    _step(engine, ids, poison=False)  # training goes on from the good weights
    assert not engine.last_step_skipped and engine.skipped_steps == 1
    after = _weights(engine)
    assert all(torch.isfinite(w).all() for w in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, weights))
    check_finite_weights(engine, "a test checkpoint", Path("/nonexistent"))


def test_guard_counts_skips_resets_on_a_good_step_and_stops_a_streak(tmp_path):
    guard = NumericalGuard(max_bad=2, ckpt_root=tmp_path / "checkpoints")
    guard.observe(1, skipped=False, loss=2.0, grad_norm=1.0)
    assert guard.healthy and guard.metrics() == {}
    guard.observe(2, skipped=True, loss=math.nan, grad_norm=None)
    assert not guard.healthy and guard.metrics() == {"skipped_steps": 1}
    guard.observe(3, skipped=False, loss=1.5, grad_norm=0.5)
    assert guard.healthy and guard.metrics() == {"skipped_steps": 1}
    guard.observe(4, skipped=True, loss=math.inf, grad_norm=None)
    with pytest.raises(NonFiniteError, match=r"step 5: 2 non-finite steps in a row .* loss nan, .*last good "
                                             r"checkpoint: none"):
        guard.observe(5, skipped=True, loss=math.nan, grad_norm=None)
    assert guard.metrics() == {"skipped_steps": 3}


def test_an_applied_step_with_a_non_finite_gradient_norm_counts_as_bad(tmp_path):
    guard = NumericalGuard(max_bad=1, ckpt_root=tmp_path)
    with pytest.raises(NonFiniteError, match="step 7"):
        guard.observe(7, skipped=False, loss=3.0, grad_norm=math.inf)


def test_metrics_lines_stay_json_with_null_for_non_finite_values(tmp_path):
    logger = MetricsLogger(tmp_path, LoggerConfig(progress=False), enabled=True, total_steps=3, start_step=0,
                           run_config={})
    logger.log({"step": 1, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3}, echo=False)
    logger.close()
    row = _strict_json((tmp_path / METRICS_FILE).read_text().splitlines()[0])
    assert row == {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3}
