"""Process environment: caches, the accelerator choice and the process group.

Everything here runs before DeepSpeed is imported, because DeepSpeed reads ``DS_ACCELERATOR`` and
``TORCH_EXTENSIONS_DIR`` at import time.

A rank that stops answering never hangs the job: every process group, DeepSpeed's own included, gets
``deepspeed.timeout_minutes`` (plus ``BACKSTOP``), and on several ranks a watchdog thread
(:mod:`llmsys.distributed.watchdog`) ends each live rank, exit status 4, once its main thread has waited
``deepspeed.timeout_minutes`` in one collective, with one line naming the collective and the rank that is not
responding.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch

from llmsys.config import DeepSpeedConfig
from llmsys.distributed.watchdog import STORE_TIMEOUT_S, Watchdog
from llmsys.paths import llmsys_home, torch_extensions_home

log = logging.getLogger(__name__)

# torch's own collective timers run this much longer than the watchdog's, so that the watchdog, which can
# say who is not responding, speaks first; they still end what it cannot see.
BACKSTOP = timedelta(seconds=30)
_watchdog: Optional[Watchdog] = None


def setup_environment() -> None:
    """Point every cache at $LLMSYS_HOME and pick DeepSpeed's accelerator. Idempotent; never overrides the user.

    - torch extensions (DeepSpeed's CPU comm op, CPU Adam): built once (~1 min cold), reused after;
    - Hugging Face (datasets, hub) and wandb caches: one known place instead of ~/.cache and the cwd;
    - ``DS_ACCELERATOR=cpu`` and ``TRITON_INTERPRET=1`` when no CUDA device is visible, so the same code
      (DeepSpeed engine, Triton kernels) runs on a laptop.
    """
    home = llmsys_home()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_home()))
    os.environ.setdefault("HF_HOME", str(home / "hf"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(home / "hf" / "datasets"))
    os.environ.setdefault("WANDB_CACHE_DIR", str(home / "wandb_cache"))
    os.environ.setdefault("WANDB_CONFIG_DIR", str(home / "wandb_config"))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # Triton compiles for GPUs only; on a CPU its kernels run interpreted. The switch must be set
        # before anything (DeepSpeed does) imports triton.language.
        os.environ.setdefault("TRITON_INTERPRET", "1")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes logs, metrics, configs and exports."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """First rank on this node: builds node-local caches (tokenizer, packed data)."""
        return self.local_rank == 0


def init_distributed(cfg: DeepSpeedConfig) -> DistInfo:
    """Join (or create) the process group under torchrun, the deepspeed launcher, SLURM or no launcher.

    A plain ``python -m llmsys.train`` gets a one-process group on a free local port, so the same code
    path (DeepSpeed engine, collectives) runs everywhere.
    """
    setup_environment()
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        # srun starts one task per GPU without torchrun: translate SLURM's variables.
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1"))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", str(world))))

    import deepspeed  # after setup_environment: reads DS_ACCELERATOR at import

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = cfg.backend or "nccl"
    else:
        device = torch.device("cpu")
        backend = cfg.backend or "gloo"  # DeepSpeed's CPU default (ccl) needs oneCCL, which PyPI lacks
    timeout = timedelta(minutes=cfg.timeout_minutes)
    _set_default_group_timeout(timeout + BACKSTOP)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timeout + BACKSTOP)
    if world > 1:
        _start_watchdog(rank, world, timeout, f"deepspeed.timeout_minutes={cfg.timeout_minutes}")
    _unlink_shm_buffer_names(rank, world, device)
    return DistInfo(rank, world, local_rank, local_world, device)


def _set_default_group_timeout(timeout: timedelta) -> None:
    """Make ``timeout`` the timeout of every process group created without one.

    torch gives such a group its backend's built-in default (30 min on gloo, 10 on NCCL), not the world
    group's, and DeepSpeed creates all of its groups that way (``new_group(ranks)`` in
    deepspeed/comm/torch.py: data parallel, ZeRO partitions, ...), so before this a stuck rank left its peers
    waiting half an hour in DeepSpeed's gradient all-reduce whatever the setting. torch has no public switch;
    ``_get_default_timeout`` in torch/distributed/distributed_c10d.py reads these two attributes at every
    ``new_group`` (``tests/reliability/test_hung_rank.py`` checks every group of an engine).
    """
    c10d = torch.distributed.distributed_c10d
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


def _start_watchdog(rank: int, world: int, timeout: timedelta, setting: str) -> None:
    """Start this rank's watchdog, its heartbeats on a connection of its own to the rendezvous store."""
    global _watchdog
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = torch.distributed.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=STORE_TIMEOUT_S))
    # torchrun's agent hosts the store its workers rendezvous on; under other launchers rank 0 does.
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    owner = f"the torchrun agent at {addr}:{port}" if agent else "rank 0"
    _watchdog = Watchdog(rank=rank, world_size=world, timeout=timeout, setting=setting, store=store,
                         store_owner=owner).start()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank (used for paths decided by one rank)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of a small tensor on this rank's device (losses and counts for logging/eval)."""
    values = values.detach().clone()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks of a small tensor (worst-case diagnostics)."""
    values = values.detach().clone()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return values


def _shm_buffer_path(rank: int) -> Path:
    """The name DeepSpeed's CPU comm op gives rank ``rank``'s all-reduce buffer (``shm_initialize`` in
    deepspeed/ops/csrc/cpu/comm/shm.cpp: ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_shm_buffer_names(rank: int, world: int, device: torch.device) -> None:
    """Remove this rank's DeepSpeed all-reduce buffer from /dev/shm as soon as every rank has mapped it.

    On the CPU, when ``LOCAL_SIZE`` (set by the deepspeed launcher) equals the world size,
    ``deepspeed.init_distributed`` creates a ~69 MB shared-memory file per rank, maps every peer's (waiting
    until each exists) and never unlinks its own, so every run, however it ended, left them behind. Once
    every rank is past ``init_distributed`` (the barrier) each buffer is mapped by every rank; a mapping
    outlives its name, so the names can go now: the all-reduce keeps working, the memory is freed when the
    last rank exits, and even a SIGKILL leaves nothing in /dev/shm.
    """
    if device.type != "cpu":
        return
    if world > 1:
        torch.distributed.barrier()
    _shm_buffer_path(rank).unlink(missing_ok=True)  # none without LOCAL_SIZE (torchrun, srun, several nodes)


def shutdown(dist: Optional[DistInfo], clean: bool = True) -> None:
    """Leave the process group.

    ``clean=False`` (this rank failed) skips the final barrier: the other ranks will not reach it,
    and the launcher ends them when this process exits non-zero.
    """
    global _watchdog
    if torch.distributed.is_initialized():
        if clean:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None
