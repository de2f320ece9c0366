"""DeepSpeed's CPU shared-memory all-reduce leaves nothing in /dev/shm, even when a run is SIGKILLed.

Under the deepspeed launcher (``LOCAL_SIZE`` set) ``deepspeed.init_distributed`` creates one ~69 MB
``/dev/shm/deepspeed_allreduce_buffer_*`` file per rank and never removes it; llmsys unlinks the names as
soon as every rank has mapped every buffer (llmsys.distributed.env). These tests run real launcher jobs:
one killed mid-training, one that checks the all-reduce still sums correctly through the unlinked buffers.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.trainers.helpers import SMALL, cleanup_shm, command, free_port, metrics

pytestmark = pytest.mark.slow


def _buffers(port: int) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def _prefix(port: int) -> str:
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}"


def _rank_pids(session: int) -> list[int]:
    """The training processes (not the launchers) of the process session ``session``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getsid(int(entry.name)) == session:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                launcher = b"deepspeed.launcher.runner" in argv or b"deepspeed.launcher.launch" in argv
                if b"llmsys.train" in argv and not launcher:
                    pids.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return pids


def _mapped_buffers(pid: int, port: int) -> set[str]:
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split(None, 5)[5] for line in maps if _prefix(port) in line}


def _env() -> dict[str, str]:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def test_a_sigkilled_launcher_run_leaves_no_buffers(tmp_path):
    out, port = tmp_path / "run", free_port()
    cmd = command([f"trainer.output_dir={out}", *SMALL, "trainer.max_steps=100000", "trainer.log_every=1",
                   "trainer.eval_every=0", "trainer.save_every=0"], nproc=2, launcher="deepspeed", port=port)
    log = (tmp_path / "log").open("w")
    # Its own process group: the launcher and both ranks are killed at once, none gets to clean up.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").is_file() and any("loss" in row for row in metrics(out))):
            assert proc.poll() is None, f"the run ended before training: {(tmp_path / 'log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no training step logged within 300 s"
            time.sleep(0.5)
        ranks = _rank_pids(proc.pid)
        assert len(ranks) == 2
        for pid in ranks:
            # The launcher's LOCAL_SIZE switched DeepSpeed's buffers on; each rank maps both, their names gone.
            assert "LOCAL_SIZE=2" in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
            assert _mapped_buffers(pid, port) == {f"{_prefix(port)}_{r} (deleted)" for r in range(2)}
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        assert _buffers(port) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        cleanup_shm(port)


def test_the_shared_memory_all_reduce_works_on_unlinked_buffers(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           "--no_local_rank", "--module", "tests.reliability.shm_allreduce", str(tmp_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert _buffers(port) == []
    finally:
        cleanup_shm(port)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["names_left"] == []  # unlinked before the first all-reduce
        assert result["uses_shm"]  # DeepSpeed's shared-memory op did the sums, not the gloo fallback
        assert len(result["max_errors"]) == 6 and max(result["max_errors"]) < 1e-5
