"""A stuck rank ends the job: a real SIGSTOP to one rank of a real 2-process run makes every live process
exit non-zero within ``deepspeed.timeout_minutes`` plus a margin, with one line naming the rank that is not
responding and the collective that waited (llmsys/distributed/watchdog.py); the timeout reaches every
process group, DeepSpeed's own included; a healthy 2-process run is untouched."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

import psutil
import pytest
import torch

from llmsys.distributed.watchdog import EXIT_HUNG
from tests.trainers.helpers import SMALL, cleanup_shm, command, free_port, metrics, train

REPO = Path(__file__).resolve().parents[2]
# From the SIGSTOP until the last process of the job is gone: the 60 s of deepspeed.timeout_minutes=1, the
# watchdog's polling, the launcher's 30 s of SIGTERM grace before it SIGKILLs the stopped rank, and a loaded
# 2-core machine.
DEADLINE_S = 150
RUN = [*SMALL, "deepspeed=zero2", "deepspeed.timeout_minutes=1", "trainer.max_steps=100000",
       "trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=0"]
# "llmsys: rank 0 waited 61 s in all_reduce (called from deepspeed/...); rank 1 not responding (...)"
LINE = re.compile(r"^llmsys: rank (\d+) waited (\d+) s in (\w+) \(called from (\S+)[^;]*; (.*)$", re.M)


def _rank_processes(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """The launcher's descendants that are training ranks, by RANK."""
    ranks = {}
    for child in launcher.children(recursive=True):
        try:
            argv = child.cmdline()
            if any(argv[i:i + 2] == ["-m", "llmsys.train"] for i in range(len(argv))):
                ranks[int(child.environ()["RANK"])] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return ranks


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_for_steps(out: Path, job: subprocess.Popen, log: Path, steps: int = 3, limit_s: float = 600) -> None:
    deadline = time.monotonic() + limit_s
    lines = out / "metrics.jsonl"
    while not lines.exists() or lines.read_text().count('"loss"') < steps:  # a line may be half-written
        assert job.poll() is None, f"the run ended before training: {log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no training steps logged in {limit_s} s: {log.read_text()[-4000:]}"
        time.sleep(0.5)


def _stop_rank_1_and_watch(tmp_path: Path, launcher: str) -> tuple[Optional[int], float, str, list]:
    """Start a 2-process run, SIGSTOP rank 1 once it trains; the launcher's exit status (None: still running
    ``DEADLINE_S`` later), the seconds from the SIGSTOP until it exited, its output, and the job's processes
    (launcher's children, both ranks) still there then."""
    out, log, port = tmp_path / "run", tmp_path / "job.log", free_port()
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    stopped: Optional[psutil.Process] = None
    with log.open("w") as sink:
        job = subprocess.Popen(command([f"trainer.output_dir={out}", *RUN], 2, launcher, port), cwd=REPO, env=env,
                               stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_steps(out, job, log)
        launcher_process = psutil.Process(job.pid)
        ranks = _rank_processes(launcher_process)
        assert sorted(ranks) == [0, 1], ranks
        tree = launcher_process.children(recursive=True)
        stopped = ranks[1]
        stopped.suspend()  # SIGSTOP
        t0 = time.monotonic()
        try:
            rc = job.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            rc = None
        elapsed = time.monotonic() - t0
        return rc, elapsed, log.read_text(), [p for p in tree if _alive(p)]
    finally:
        if stopped is not None and _alive(stopped):
            stopped.kill()
        try:
            os.killpg(job.pid, signal.SIGKILL)  # whatever of this job is still there (its own session)
        except ProcessLookupError:
            pass
        job.wait()
        cleanup_shm(port)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_a_stopped_rank_ends_every_process_of_the_job_naming_it(tmp_path, launcher):
    rc, elapsed, output, left = _stop_rank_1_and_watch(tmp_path, launcher)

    assert rc is not None, f"{launcher} still running {DEADLINE_S} s after the SIGSTOP:\n{output[-4000:]}"
    assert rc != 0 and not left, (rc, left, output[-4000:])
    lines = LINE.findall(output)
    assert len(lines) == 1, output[-4000:]  # rank 0, the only live rank, said it once
    rank, waited, collective, caller, verdict = lines[0]
    assert rank == "0" and verdict.startswith("rank 1 not responding"), lines[0]
    assert 60 <= int(waited) < 90, lines[0]  # the whole timeout, and before torch's own timer (BACKSTOP)
    assert hasattr(torch.distributed, collective) and not caller.startswith("torch/"), lines[0]
    # The watchdog spoke before torch's own timer (whose gloo error names neither peer nor collective).
    assert f"exit {EXIT_HUNG}" in output and "Timed out waiting" not in output, output[-4000:]
    print(f"{launcher}: every process gone {elapsed:.0f} s after the SIGSTOP;",
          *re.findall(r"^llmsys: rank.*$", output, re.M))


# -- the watchdog alone, on a bare gloo group (seconds instead of minutes) -----------------------------------

WATCHDOG_TIMEOUT_S = 4


def _watchdog_worker() -> None:
    """One rank of ``python -m tests.reliability.test_hung_rank``: all-reduces under a watchdog, forever, or
    ``STEPS`` times with rank 1 pausing half the watchdog's timeout every hundredth."""
    from llmsys.distributed.watchdog import STORE_TIMEOUT_S, Watchdog

    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=300))  # env://: rank 0 hosts the store
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                       timeout=timedelta(seconds=STORE_TIMEOUT_S))
    watchdog = Watchdog(rank=rank, world_size=world, timeout=timedelta(seconds=WATCHDOG_TIMEOUT_S),
                        setting="test=4s", store=store, store_owner="rank 0").start()
    limit = int(os.environ.get("STEPS", "0"))
    x, steps = torch.ones(4), 0
    while not limit or steps < limit:
        torch.distributed.all_reduce(x)
        x.fill_(1.0)
        steps += 1
        if steps == 20:
            print("reducing", flush=True)
        if limit and rank == 1 and steps % 100 == 0:
            time.sleep(WATCHDOG_TIMEOUT_S / 2)
    torch.distributed.barrier()
    watchdog.stop()
    torch.distributed.destroy_process_group()
    print(f"done after {steps} all-reduces", flush=True)


def _start_workers(port: int, extra_env: Optional[dict] = None) -> list[subprocess.Popen]:
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", **(extra_env or {}))
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.reliability.test_hung_rank"], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.parametrize("stopped_rank,verdict", [
    (1, "rank 1 not responding (no heartbeat in the last"),
    (0, "the heartbeat store does not answer: rank 0, which hosts it, is not responding"),
])
def test_the_watchdog_names_the_stopped_peer_or_the_silent_store_host(tmp_path, stopped_rank, verdict):
    procs = _start_workers(free_port())
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "reducing", proc.communicate()[1][-3000:]
        os.kill(procs[stopped_rank].pid, signal.SIGSTOP)
        t0 = time.monotonic()
        live = procs[1 - stopped_rank]
        _, err = live.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()

    assert live.returncode == EXIT_HUNG, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("llmsys:")]
    assert len(lines) == 1 and f"llmsys: rank {1 - stopped_rank} waited" in lines[0], err[-3000:]
    assert " in all_reduce (called from tests/reliability/test_hung_rank.py:" in lines[0], lines[0]
    assert verdict in lines[0], lines[0]
    assert WATCHDOG_TIMEOUT_S <= elapsed < WATCHDOG_TIMEOUT_S + 30, (elapsed, lines[0])


def test_the_watchdog_leaves_waits_shorter_than_its_timeout_alone():
    """Two timeouts' worth of back-to-back all-reduces (the main thread nearly always inside one), with
    four waits of half the timeout for a slow peer: no false alarm."""
    procs = _start_workers(free_port(), {"STEPS": "400"})
    try:
        results = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0 and "llmsys:" not in err, err[-3000:]
        assert "done after 400 all-reduces" in out, out


# -- the setting reaches every group; a healthy run is untouched -------------------------------------------------


_GROUP_TIMEOUTS = """
import json, torch
from llmsys.config import DeepSpeedConfig, ModelConfig, OptimConfig, TrainerConfig
from llmsys.distributed import Engine, init_distributed, shutdown
from llmsys.models import Transformer

cfg = ModelConfig(vocab_size=61, dim=32, n_layers=1, n_heads=4, ffn_dim=64, max_seq_len=32)
ds = DeepSpeedConfig(stage=2, timeout_minutes=1)
dist = init_distributed(ds)
Engine(lambda: Transformer(cfg), ds=ds, optim=OptimConfig(), trainer=TrainerConfig(global_batch_size=2,
       micro_batch_size=2), dist=dist, max_steps=2)
c10d = torch.distributed.distributed_c10d
print(json.dumps({pg.group_name: pg._get_backend(torch.device("cpu")).options._timeout.total_seconds()
                  for pg in c10d._world.pg_map}))
shutdown(dist)
"""


def test_every_process_group_of_an_engine_gets_the_configured_timeout():
    """DeepSpeed creates its groups (data parallel, ZeRO partitions) without a timeout: before llmsys set
    torch's default they had gloo's 30 minutes whatever ``deepspeed.timeout_minutes`` said. (In a process of
    its own: DeepSpeed keeps its groups in module globals, which a later engine in this process would reuse.)"""
    import json

    from llmsys.distributed.env import BACKSTOP

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", _GROUP_TIMEOUTS], capture_output=True, text=True, timeout=300,
                          env=dict(env, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    timeouts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(timeouts) > 1, timeouts  # the world group and DeepSpeed's own
    assert set(timeouts.values()) == {(timedelta(minutes=1) + BACKSTOP).total_seconds()}, timeouts


@pytest.mark.slow
def test_a_healthy_two_process_run_is_untouched_by_the_watchdog(tmp_path):
    """The watchdog runs (two ranks) and stays quiet. That ZeRO 1-3 on two processes still give the losses of
    one is tests/trainers/test_pretrain.py::test_zero_two_processes_match_one."""
    out = tmp_path / "run"
    proc = train(out, ["deepspeed=zero2", "deepspeed.timeout_minutes=1", "trainer.max_steps=6", "trainer.log_every=1"],
                 nproc=2, launcher="torchrun")
    assert [row["step"] for row in metrics(out) if "loss" in row] == list(range(1, 7))
    assert not LINE.search(proc.stderr) and "not responding" not in proc.stderr, proc.stderr[-3000:]


if __name__ == "__main__":
    _watchdog_worker()
