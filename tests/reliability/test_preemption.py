"""Preemption: SIGTERM, SIGUSR1 and a first SIGINT finish the step, write a checkpoint and exit 0, and the
same command resumes there; a second Ctrl-C stops at once; before training begins a signal stops at once.
Real signals to real processes, alone, under torchrun, and through ``launch/slurm.sbatch`` with ``srun`` and
``scontrol`` stood in for by scripts that run the task here and record the requeue."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import psutil
import pytest

from llmsys.distributed import checkpoint_dirs, verify_checkpoint
from tests.trainers.helpers import SMALL, cleanup_shm, command, free_port, metrics, train

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BASE = [*SMALL, "stage=pretrain", "trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=1000"]
SLOW_STEP = ["trainer.global_batch_size=8192", "trainer.micro_batch_size=8"]  # seconds a step, loaded or not


def _env(**extra: str) -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **extra)


def _start(cmd: list[str], env: Optional[dict] = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or _env(),
                            cwd=REPO)


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        rows = metrics(out) if (out / "metrics.jsonl").is_file() else []
        if any(row.get("step", 0) >= step and "loss" in row for row in rows):
            return
        assert proc.poll() is None, f"exited {proc.returncode} before step {step}:\n{proc.communicate()[1][-4000:]}"
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.1)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.communicate()
    return proc.returncode, err, time.monotonic() - started


def _checkpoint_steps(out: Path) -> list[int]:
    return [int(d.name.split("_")[1]) for d in checkpoint_dirs(out / "checkpoints")]


def _trained_steps(out: Path) -> list[int]:
    return [row["step"] for row in metrics(out) if "loss" in row]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_stop_signal_checkpoints_the_step_exits_0_and_the_same_command_resumes(tmp_path, sig):
    out = tmp_path / "run"
    overrides = [f"trainer.output_dir={out}", *BASE, "trainer.max_steps=400"]
    proc = _start(command(overrides))
    _wait_for_step(proc, out, 3)
    proc.send_signal(sig)
    rc, err, seconds = _finish(proc, timeout=120)

    assert rc == 0, err[-4000:]
    stopped_at = _trained_steps(out)[-1]
    assert 3 <= stopped_at < 400
    assert _checkpoint_steps(out) == [stopped_at]  # written for the step it stopped after, and complete
    verify_checkpoint(out / "checkpoints" / f"step_{stopped_at:08d}")
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"
    assert f"{sig.name}: stopped after step {stopped_at}" in err
    assert not (out / "final").exists()

    resumed = train(out, [*BASE, "trainer.max_steps=" + str(stopped_at + 3)], check=True)
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}" in resumed.stderr
    rows = [row for row in metrics(out) if "loss" in row]
    assert [row["step"] for row in rows] == list(range(1, stopped_at + 4))
    per_step = rows[0]["tokens"]
    assert [row["tokens"] for row in rows] == [per_step * row["step"] for row in rows]  # counter carried over
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("target", ["rank1", "torchrun"])
def test_two_ranks_stop_after_the_same_step_whoever_gets_the_signal(tmp_path, target):
    # SIGUSR1 to rank 1 alone; or SIGTERM to torchrun, which passes it on to its workers.
    out, port = tmp_path / "run", free_port()
    proc = _start(command([f"trainer.output_dir={out}", *BASE, "trainer.max_steps=400"], 2, "torchrun", port))
    try:
        _wait_for_step(proc, out, 3)
        if target == "rank1":
            workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "llmsys.train" in p.cmdline()]
            next(p for p in workers if p.environ().get("RANK") == "1").send_signal(signal.SIGUSR1)
        else:
            proc.send_signal(signal.SIGTERM)
        rc, err, _ = _finish(proc, timeout=180)
    finally:
        cleanup_shm(port)
    # torchrun itself exits 1 after a SIGTERM (its SignalException); its workers exited 0 with the checkpoint.
    assert rc == (0 if target == "rank1" else 1), err[-4000:]
    stopped_at = _trained_steps(out)[-1]
    assert _checkpoint_steps(out) == [stopped_at]
    state = verify_checkpoint(out / "checkpoints" / f"step_{stopped_at:08d}")
    assert state["world_size"] == 2 and (out / "checkpoints" / f"step_{stopped_at:08d}" / "rng_rank1.pt").is_file()
    signal_name = "SIGUSR1" if target == "rank1" else "SIGTERM"
    assert f"{signal_name}: stopped after step {stopped_at}" in err


def test_sigint_twice_stops_at_once_without_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = _start(command([f"trainer.output_dir={out}", *BASE, *SLOW_STEP, "trainer.max_steps=50"]))
    _wait_for_step(proc, out, 1)  # step 2 has just begun and takes seconds
    proc.send_signal(signal.SIGINT)
    time.sleep(StopSignalsDelay.SECOND)
    proc.send_signal(signal.SIGINT)
    rc, err, seconds = _finish(proc, timeout=60)
    assert rc == 128 + signal.SIGINT, err[-4000:]
    assert "stopped at once by SIGINT, without writing a checkpoint" in err
    assert _trained_steps(out) == [1] and _checkpoint_steps(out) == []
    assert not list((out / "checkpoints").glob("*.tmp")) if (out / "checkpoints").exists() else True


def test_a_forwarded_copy_of_the_same_ctrl_c_is_not_a_second_one(tmp_path):
    # A terminal's Ctrl-C reaches torchrun and its workers at once, and torchrun passes it on again.
    out = tmp_path / "run"
    proc = _start(command([f"trainer.output_dir={out}", *BASE, *SLOW_STEP, "trainer.max_steps=50"]))
    _wait_for_step(proc, out, 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    rc, err, _ = _finish(proc, timeout=120)
    assert rc == 0, err[-4000:]
    assert _checkpoint_steps(out) == [2] and "SIGINT: stopped after step 2" in err


def test_a_signal_before_training_stops_at_once_and_leaves_no_worker_processes(tmp_path):
    # Tokenising a corpus with data.num_proc worker processes (datasets' pool), into a fresh cache.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    line = "The quick brown fox jumps over the lazy dog while the cat sleeps. "
    for i in range(40):
        (corpus / f"doc{i}.txt").write_text(line * 4000 + f" {i}\n")
    out = tmp_path / "run"
    proc = _start(command([f"trainer.output_dir={out}", *BASE, "data=files", f"data.path={corpus}",
                           "data.num_proc=2", f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=5"]))
    deadline = time.monotonic() + 300
    workers: list[psutil.Process] = []
    while len(workers) < 2:
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "the tokenising workers never started"
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "llmsys.train" in " ".join(p.cmdline())]  # forked by the pool; not e.g. ninja
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    rc, err, seconds = _finish(proc, timeout=60)
    assert rc == 128 + signal.SIGTERM, err[-4000:]
    assert "stopped at once by SIGTERM" in err
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
    assert not (out / "checkpoints").exists()


class StopSignalsDelay:
    SECOND = 1.5  # after the first SIGINT: more than StopSignals.SAME_INTERRUPT_S, less than a step


def _shims(tmp_path: Path) -> tuple[Path, Path]:
    """``srun`` that runs the task here (one task: SLURM's variables set, options dropped, exec'd so the
    signals it would forward reach the task) and ``scontrol`` that answers ``show hostnames`` and records
    ``requeue``."""
    bin_dir, record = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n"
        "export SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0 SLURM_NTASKS_PER_NODE=1\n"
        f"exec {sys.executable} \"${{@:2}}\"\n")
    (bin_dir / "scontrol").write_text(
        "#!/usr/bin/env bash\n"
        f"if [ \"$1 $2\" = 'show hostnames' ]; then echo 127.0.0.1; else echo \"$@\" >> {record}; fi\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir, record


def test_slurm_script_checkpoints_on_the_time_limit_signal_requeues_and_the_requeued_job_resumes(tmp_path):
    bin_dir, record = _shims(tmp_path)
    out, port = tmp_path / "run", free_port()
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node1",
               MASTER_PORT=str(port))
    job = ["bash", str(REPO / "launch" / "slurm.sbatch"), f"trainer.output_dir={out}", *BASE, "trainer.max_steps=60"]
    first = _start(job, env)
    _wait_for_step(first, out, 3)
    first.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends to the batch script
    rc, err, _ = _finish(first, timeout=120)
    assert rc == 0, err[-4000:]
    assert record.read_text().split("\n")[0] == "requeue 4242"
    stopped_at = _trained_steps(out)[-1]
    assert stopped_at < 60 and _checkpoint_steps(out) == [stopped_at]

    second = _start(job, env)  # the requeued job: the same script, the same arguments
    rc, err, _ = _finish(second, timeout=300)
    assert rc == 0, err[-4000:]
    assert f"at step {stopped_at}" in err and "resumed from" in err
    assert _trained_steps(out) == list(range(1, 61))
    assert (out / "final" / "model.safetensors").is_file()
    assert record.read_text().splitlines() == ["requeue 4242"]  # a job that finished is not requeued
    cleanup_shm(port)
    assert json.loads((out / "final" / "config.json").read_text())["step"] == 60


def test_sigterm_to_the_pipeline_stops_its_stage_with_a_checkpoint_and_the_rerun_resumes_it(tmp_path):
    out = tmp_path / "pipe"
    args = [sys.executable, "-m", "llmsys.pipeline", "--out", str(out), "--stages", "pretrain", "--probe-prompts",
            "2", "--max-new-tokens", "4", *SMALL, "trainer.log_every=1", "trainer.eval_every=0",
            "pretrain:trainer.max_steps=400"]
    pipeline = _start(args)
    _wait_for_step(pipeline, out / "pretrain", 3)
    pipeline.send_signal(signal.SIGTERM)  # to the pipeline only: it passes the signal on to the stage
    rc, err, _ = _finish(pipeline, timeout=120)
    assert rc == 0, err[-4000:]
    stopped_at = _trained_steps(out / "pretrain")[-1]
    assert stopped_at < 400 and _checkpoint_steps(out / "pretrain") == [stopped_at]
    assert "pretrain: stopped before the end" in err
    assert not (out / "report.json").exists() and not (out / "pretrain" / "final").exists()

    args[-1] = f"pretrain:trainer.max_steps={stopped_at + 2}"
    rerun = subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"at step {stopped_at}" in rerun.stderr and "resumed from" in rerun.stderr
    assert _trained_steps(out / "pretrain") == list(range(1, stopped_at + 3))
    assert (out / "pretrain" / "final" / "model.safetensors").is_file() and (out / "report.json").is_file()
