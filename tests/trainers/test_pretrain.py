"""End-to-end pre-training runs on the embedded corpus, as separate processes (the way users launch them)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from llmsys.data import collate_blocks, load_pretrain_data
from llmsys.models import Transformer, load_state, read_config
from tests.trainers.helpers import (
    SMALL,
    cleanup_shm,
    command,
    free_port,
    metrics,
    train,
    train_losses,
    val_losses,
)

pytestmark = pytest.mark.slow


def test_validation_loss_falls_and_export_reloads(tmp_path):
    out = tmp_path / "run"
    train(out, ["trainer.max_steps=60", "trainer.eval_every=20", "trainer.eval_samples=32", "trainer.log_every=10",
                "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "optim.warmup_steps=5",
                "trainer.save_every=30"])
    val = val_losses(out)
    assert sorted(val) == [0, 20, 40, 60]
    assert val[20] < val[0] and val[40] < val[20] and val[60] < val[40], val
    assert val[60] < val[0] - 0.5, val  # from ~ln(512) = 6.2 to well below
    first_train_row = next(r for r in metrics(out) if "loss" in r)
    assert {"step", "loss", "lr", "tokens_per_sec"} <= set(first_train_row)
    saved = (out / "config.yaml").read_text()
    assert "seq_len: 32" in saved and f"output_dir: {out}" in saved
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000030", "step_00000060"]

    # The export is what the next stage starts from: it must reload and reproduce the logged val loss.
    final = out / "final"
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in final.iterdir()}
    meta = json.loads((final / "config.json").read_text())
    assert meta["stage"] == "pretrain" and meta["step"] == 60
    cfg = read_config(final)
    model = Transformer(cfg).eval()
    model.load_state_dict(load_state(final, cfg))
    data = load_pretrain_data(Path(meta["data_cache"]), 32)
    with torch.no_grad():
        losses = [model(**collate_blocks([data.val[j] for j in range(i, i + 4)])).item() for i in range(0, 32, 4)]
    assert sum(losses) / len(losses) == pytest.approx(val[60], rel=1e-5)


def _losses_equal(a: dict[int, float], b: dict[int, float], rel: float) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        assert abs(a[step] - b[step]) <= rel * abs(a[step]), (step, a[step], b[step])


def _last_logged_step(out) -> int:
    # The run is writing the file right now: a torn last line is simply not counted yet.
    path = out / "metrics.jsonl"
    steps = [0]
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            pass
    return max(steps)


ZERO_COMMON = ["trainer.max_steps=6", "trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=0",
               "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero") / "single"
    train(out, ZERO_COMMON + ["deepspeed=zero0"])
    return train_losses(out)


@pytest.mark.parametrize("stage,launcher", [(1, "torchrun"), (2, "deepspeed"), (3, "torchrun")])
def test_zero_two_processes_match_one(tmp_path, single_process_losses, stage, launcher):
    out = tmp_path / f"zero{stage}"
    train(out, ZERO_COMMON + [f"deepspeed=zero{stage}"], nproc=2, launcher=launcher)
    losses = train_losses(out)
    assert len(losses) == 6
    _losses_equal(single_process_losses, losses, rel=1e-4)
    # Training moved the loss (the comparison is not between two untrained models).
    assert losses[6] < losses[1]
    assert (out / "final" / "model.safetensors").is_file()


def test_csrc_fused_ops_on_two_processes_match_the_torch_ops(tmp_path, single_process_losses):
    # llmsys._C's RMSNorm (+residual), rotary and SwiGLU (CPU twins here) under ZeRO-2 on 2 ranks.
    out = tmp_path / "fused_ops"
    train(out, ZERO_COMMON + ["deepspeed=zero2", "model.norm=fused", "model.rope=fused", "model.mlp=fused"],
          nproc=2, launcher="torchrun")
    _losses_equal(single_process_losses, train_losses(out), rel=1e-4)


def test_zero3_offload_two_processes_match_one(tmp_path, single_process_losses):
    # Parameters and optimizer state in CPU memory, stepped by DeepSpeed's CPU Adam (built on first use).
    out = tmp_path / "zero3_offload"
    train(out, ZERO_COMMON + ["deepspeed=zero3_offload"], nproc=2, launcher="torchrun", timeout=900)
    # A different AdamW implementation (vectorised C++): equal math, different rounding order.
    _losses_equal(single_process_losses, train_losses(out), rel=1e-4)


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    common = ["trainer.max_steps=40", "trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=4",
              "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "optim.warmup_steps=4"]
    ref = tmp_path / "ref"
    train(ref, common)

    out = tmp_path / "killed"
    port = free_port()
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_PORT=str(port))
    proc = subprocess.Popen(command([f"trainer.output_dir={out}", *SMALL, *common]), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    try:
        # Kill hard once a checkpoint exists and training has gone past it.
        while time.time() < deadline and proc.poll() is None:
            if latest.is_file() and _last_logged_step(out) >= 6:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    finally:
        cleanup_shm(port)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(train_losses(out))
    assert killed_at < 40

    train(out, common + ["trainer.resume=auto"])
    resumed, reference = train_losses(out), train_losses(ref)
    assert sorted(resumed) == list(range(1, 41))  # lines after the checkpoint were replaced, not duplicated
    for step in reference:  # fp32 on CPU: the same numbers, step for step
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    ref_w = load_state(ref / "final", read_config(ref / "final"))
    res_w = load_state(out / "final", read_config(out / "final"))
    for name in ref_w:
        torch.testing.assert_close(res_w[name], ref_w[name], rtol=1e-6, atol=1e-7)


def test_resume_none_refuses_to_train_over_checkpoints(tmp_path):
    out = tmp_path / "run"
    train(out, ["trainer.max_steps=2", "trainer.eval_every=0", "trainer.global_batch_size=4",
                "trainer.micro_batch_size=4"])
    proc = train(out, ["trainer.max_steps=2", "trainer.resume=none"], check=False)
    assert proc.returncode != 0
    assert "trainer.resume=auto" in proc.stderr and str(out / "checkpoints") in proc.stderr
    # resume=auto on a finished run does no training and keeps the export.
    train(out, ["trainer.max_steps=2", "trainer.eval_every=0", "trainer.global_batch_size=4",
                "trainer.micro_batch_size=4"])
    assert (out / "final" / "model.safetensors").is_file()


def test_bf16_run_trains(tmp_path):
    out = tmp_path / "bf16"
    train(out, ["trainer.precision=bf16", "trainer.max_steps=10", "trainer.log_every=5", "trainer.eval_every=0",
                "trainer.global_batch_size=8", "trainer.micro_batch_size=8", "deepspeed=zero1"])
    losses = train_losses(out)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert losses[10] < losses[5]


def test_missing_data_path_fails_with_the_path(tmp_path):
    missing = tmp_path / "no_such_corpus"
    proc = train(tmp_path / "run", ["data=files", f"data.path={missing}"], check=False)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr


@pytest.mark.parametrize("stage,nproc", [(0, 1), (3, 2)])
def test_init_from_export_starts_where_the_previous_run_ended(tmp_path, stage, nproc):
    common = ["trainer.eval_every=4", "trainer.eval_samples=16", "trainer.global_batch_size=8",
              "trainer.micro_batch_size=4"]
    first = tmp_path / "first"
    train(first, common + ["trainer.max_steps=4"])
    second = tmp_path / "second"
    # Under ZeRO-3 on 2 ranks the weights are loaded into partitioned parameters (gathered, copied on rank 0).
    train(second, common + ["trainer.max_steps=4", f"model.init_from={first / 'final'}", f"deepspeed=zero{stage}"],
          nproc=nproc, launcher="torchrun" if nproc > 1 else "python")
    assert val_losses(second)[0] == pytest.approx(val_losses(first)[4], rel=1e-5)
    assert val_losses(second)[4] < val_losses(second)[0]


def test_triton_attention_and_fused_loss_train_like_the_reference(tmp_path):
    # On CPU the Triton kernels run interpreted (slow): few, small steps; the comparison is exact math.
    common = ["trainer.max_steps=3", "trainer.log_every=1", "trainer.eval_every=3", "trainer.eval_samples=4",
              "trainer.global_batch_size=4", "trainer.micro_batch_size=4", "optim.warmup_steps=1"]
    train(tmp_path / "ref", common)
    train(tmp_path / "kernels", common + ["model.attention=triton", "model.loss=fused"])
    _losses_equal(train_losses(tmp_path / "ref"), train_losses(tmp_path / "kernels"), rel=1e-4)
    assert val_losses(tmp_path / "kernels")[3] == pytest.approx(val_losses(tmp_path / "ref")[3], rel=1e-4)
    assert val_losses(tmp_path / "kernels")[3] < val_losses(tmp_path / "kernels")[0]
