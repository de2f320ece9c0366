"""Run ``llmsys.train`` the way users do: as separate processes, alone or under torchrun / deepspeed."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

# A small model on the embedded corpus: every step is real training, but takes milliseconds.
SMALL = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
    "model.max_seq_len=64", "data.seq_len=32", "data.bpe_vocab_size=512", "logger.progress=false",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(overrides: list[str], nproc: int = 1, launcher: str = "python", port: Optional[int] = None) -> list[str]:
    if launcher == "python":
        assert nproc == 1
        return [sys.executable, "-m", "llmsys.train", *overrides]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(port), "-m", "llmsys.train", *overrides]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                "--master_port", str(port), "--no_local_rank", "--module", "llmsys.train", *overrides]
    raise ValueError(launcher)


def cleanup_shm(port: int) -> None:
    # DeepSpeed's CPU all-reduce buffers of a run that was killed before llmsys could remove them.
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        f.unlink(missing_ok=True)


def train(out: Path, overrides: list[str], nproc: int = 1, launcher: str = "python",
          timeout: int = 600, check: bool = True, base: tuple[str, ...] | list[str] = SMALL
          ) -> subprocess.CompletedProcess:
    """``llmsys.train`` with ``base`` (the small model, by default) and then ``overrides``."""
    port = free_port()
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1" if nproc > 1 else "2")
    cmd = command([f"trainer.output_dir={out}", *base, *overrides], nproc, launcher, port)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    finally:
        cleanup_shm(port)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(out: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metrics(out) if "loss" in row}


def val_losses(out: Path) -> dict[int, float]:
    return {row["step"]: row["val_loss"] for row in metrics(out) if "val_loss" in row}
