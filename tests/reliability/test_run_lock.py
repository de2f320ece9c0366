"""One run per output directory: a second run on a directory in use exits at once (status 2) naming the
holder, and the first completes as if alone."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from llmsys.train import EXIT_BUSY, LOCK_FILE
from tests.trainers.helpers import SMALL, command, metrics, train

STEPS = 100_000  # never reached: the first run is stopped with SIGTERM once the second has been refused


@pytest.mark.slow
def test_a_second_run_on_a_directory_in_use_exits_at_once_naming_the_first(tmp_path):
    out = tmp_path / "run"
    first_overrides = [f"trainer.output_dir={out}", *SMALL, "stage=pretrain", f"trainer.max_steps={STEPS}",
                       "trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=1000"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    first = subprocess.Popen(command(first_overrides), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)
    try:
        # The first run holds the lock once its pid is in the file (written right after it locks).
        deadline = time.monotonic() + 300
        while f"pid {first.pid} " not in ((out / LOCK_FILE).read_text() if (out / LOCK_FILE).exists() else ""):
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        second = train(out, ["stage=pretrain", "trainer.max_steps=2"], check=False, timeout=300)
        assert first.poll() is None, "the first run ended before the second was refused"
        first.send_signal(signal.SIGTERM)  # it stops after its step with a checkpoint (test_preemption.py)
        _, first_err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()

    assert second.returncode == EXIT_BUSY, second.stderr[-3000:]
    refusal = [line for line in second.stderr.splitlines() if line.startswith("llmsys:")]
    assert len(refusal) == 1 and f"pid {first.pid} on " in refusal[0] and str(out) in refusal[0], second.stderr
    assert "Traceback" not in second.stderr

    assert first.returncode == 0, first_err[-3000:]
    rows = [row for row in metrics(out) if "loss" in row]
    last = rows[-1]["step"]
    assert [row["step"] for row in rows] == list(range(1, last + 1))  # one run's lines, in order, no others
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{last:08d}"

    # The lock went with the first run: the directory is free again (resume=auto continues it).
    again = train(out, ["stage=pretrain", f"trainer.max_steps={last + 2}"], check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "final" / "model.safetensors").is_file()


def test_a_lock_held_by_another_process_is_reported_and_released_when_it_exits(tmp_path):
    """The lock itself, without training: held by a child process, refused here, free once the child is gone."""
    from llmsys.train import _try_lock

    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from llmsys.train import _try_lock; "
        f"handle, holder = _try_lock(Path({str(tmp_path)!r})); assert handle is not None, holder; "
        "print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        handle, holder = _try_lock(tmp_path)
        assert handle is None and holder.startswith(f"pid {child.pid} on ")
    finally:
        child.kill()
        child.wait()
    handle, holder = _try_lock(tmp_path)
    assert handle is not None and holder is None
    assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")
    handle.close()
