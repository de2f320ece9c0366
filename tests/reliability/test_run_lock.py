"""One run per output directory: a second run on a directory in use exits at once (status 2) naming the
holder, and the first completes as if alone."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmsys.train import EXIT_BUSY, LOCK_FILE
from tests.trainers.helpers import SMALL, command, metrics, train

STEPS = 30  # long enough to still hold the lock while the second run starts on a loaded machine


@pytest.mark.slow
def test_a_second_run_on_a_directory_in_use_exits_at_once_naming_the_first(tmp_path):
    out = tmp_path / "run"
    first_overrides = [f"trainer.output_dir={out}", *SMALL, "stage=pretrain", f"trainer.max_steps={STEPS}",
                       "trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=2"]
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
        # Refused with the first's pid proves the overlap: the lock goes when its holder exits.
        second = train(out, ["stage=pretrain", "trainer.max_steps=2"], check=False, timeout=120)
        _, first_err = first.communicate(timeout=600)
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
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))  # one run's lines, in order, no others
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"

    # The lock went with the first run: the directory is free again (resume=auto continues it).
    again = train(out, ["stage=pretrain", f"trainer.max_steps={STEPS}"], check=False)
    assert again.returncode == 0, again.stderr[-3000:]


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
