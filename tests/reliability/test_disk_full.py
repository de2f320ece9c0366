"""A full disk during a checkpoint or an export: one line naming the path and the free space, the partial
``.tmp`` removed, nothing good lost, every rank failing together.

The disks are real where the machine allows it: a tmpfs mounted at the size that holds the first checkpoint
but not the second. One rank's disk filling alone cannot be arranged with a shared file system, so that test
injects ``ENOSPC`` into ``torch.save`` on one rank (tests/reliability/enospc_train.py).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmsys.config import ModelConfig
from llmsys.distributed import verify_checkpoint
from llmsys.distributed.engine import _GuardedWrites
from llmsys.models import Transformer
from llmsys.models.export import load_export_state, save_pretrained
from llmsys.paths import DiskFullError, free_space
from tests.tools import missing_tool
from tests.trainers.helpers import SMALL, free_port, train, train_losses

COMMON = ["trainer.eval_every=0", "trainer.save_every=2", "trainer.log_every=1", "trainer.max_steps=4",
          "trainer.global_batch_size=4", "trainer.micro_batch_size=2"]
PAGE = 4096  # tmpfs allocates whole pages
MB = r"([\d,]+\.\d) MB"


def _mount(where: Path, n_bytes: int, remount: bool = False) -> None:
    where.mkdir(parents=True, exist_ok=True)
    options = f"{'remount,' if remount else ''}size={-(-n_bytes // 1024)}k"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        missing_tool(f"mounting a tmpfs (a real full disk) needs root or CAP_SYS_ADMIN: {proc.stderr.strip()}")


@pytest.fixture
def disk(tmp_path):
    """A mount point for a tmpfs of the size a test chooses (``_mount``), unmounted afterwards."""
    where = tmp_path / "disk"
    yield where
    if where.is_mount():
        subprocess.run(["umount", "--lazy", str(where)], check=True)  # lazy: safetensors may still map a file


def _pages(files) -> int:
    return sum(-(-f.stat().st_size // PAGE) * PAGE for f in files if f.is_file())


def _mb(n_bytes: int) -> float:
    return n_bytes / 1e6


def _number(text: str) -> float:
    return float(text.replace(",", ""))


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_a_failed_write_is_recorded_and_its_partial_file_frees_its_space(disk, zipfile):
    _mount(disk, 256 * 1024)
    writes, path = _GuardedWrites(None), disk / "shard.pt"
    state = {"w": torch.randn(100_000)}  # 400 kB: does not fit
    writes.begin(rank=3)
    writes.write(path, lambda: torch.save(state, path, _use_new_zipfile_serialization=zipfile), 400_000)
    assert writes.failure is not None and writes.failure.disk_full
    assert (writes.failure.rank, writes.failure.path) == (3, str(path))
    later = []
    writes.write(disk / "later.pt", lambda: later.append(1))
    assert later == []  # nothing more is written once a write of the save failed
    assert writes.requested_bytes == 400_000
    path.unlink()
    # The recorded error still holds torch's writer; its file must be closed, or removing it frees nothing.
    assert free_space(disk)[0] >= 256 * 1024 - 2 * PAGE


def _state(vocab: int) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, vocab_size=vocab, max_seq_len=16)
    torch.manual_seed(vocab)
    return cfg, {k: v.detach().clone() for k, v in Transformer(cfg).state_dict().items()}


def test_an_export_that_does_not_fit_keeps_the_previous_one(disk):
    small_cfg, small = _state(vocab=64)
    big_cfg, big = _state(vocab=8000)  # 8000 x 32 embedding (+ output): ~2 MB
    _mount(disk, 512 * 1024)
    out = disk / "final"
    save_pretrained(small, small_cfg, out)
    with pytest.raises(DiskFullError) as caught:
        save_pretrained(big, big_cfg, out)
    message = str(caught.value)
    match = re.fullmatch(rf"{out}: no space left on device while writing the export \({MB} free on {disk}, "
                         rf"the export needs about {MB}\); removed the partial {out}.tmp; the previous export "
                         rf"{out} is intact", message)
    assert match, message
    assert _number(match[1]) == pytest.approx(_mb(free_space(disk)[0]), abs=0.1)
    needed = sum(t.nbytes for name, t in big.items() if name != "output.weight" or not big_cfg.tie_embeddings)
    assert _number(match[2]) == pytest.approx(_mb(needed), abs=0.1)
    assert not (disk / "final.tmp").exists()
    kept = load_export_state(out, small_cfg)
    assert all(torch.equal(kept[name], small[name]) for name in small)


@pytest.mark.slow
def test_a_run_whose_second_checkpoint_does_not_fit_stops_in_one_line_and_resumes(tmp_path, disk):
    ref = tmp_path / "ref"
    train(ref, COMMON)
    first = ref / "checkpoints" / "step_00000002"
    others = [f for f in ref.rglob("*") if "checkpoints" not in f.parts and "final" not in f.parts]
    # Room for the run's own files and one checkpoint and a half: the save at step 4 runs out.
    _mount(disk, _pages(others) + _pages(first.iterdir()) * 3 // 2)
    out, root = disk / "run", disk / "run" / "checkpoints"

    proc = train(out, COMMON, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("llmsys: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    tmp, kept = root / "step_00000004.tmp", root / "step_00000002"
    match = re.search(rf"{tmp}/mp_rank_00_model_states.pt: no space left on device while writing checkpoint step 4 "
                      rf"\({MB} free on {disk}, the checkpoint needs about {MB}\); removed the partial {tmp}; "
                      rf"the last good checkpoint {kept} is intact", lines[0])
    assert match, lines[0]
    assert _number(match[1]) == pytest.approx(_mb(free_space(disk)[0]), abs=0.1)
    checkpoint_bytes = sum(f.stat().st_size for f in first.iterdir())
    assert _number(match[2]) == pytest.approx(_mb(checkpoint_bytes), rel=0.1)
    assert "Traceback" not in proc.stderr
    # Nothing half-written is left, nothing good is lost.
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert verify_checkpoint(kept)["step"] == 2
    assert not (out / "final").exists() and not (out / "final.tmp").exists()

    # With room again, the run resumes from the checkpoint that was kept and trains on as if never stopped.
    _mount(disk, 4 * (_pages(others) + _pages(first.iterdir())), remount=True)
    proc = train(out, COMMON + ["trainer.resume=auto"])
    assert f"resumed from {kept} at step 2" in proc.stderr
    assert train_losses(out) == pytest.approx(train_losses(ref), rel=1e-6)
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_full_disk_on_one_rank_fails_every_rank_together(tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    port = free_port()
    overrides = [f"trainer.output_dir={out}", *SMALL, *COMMON, "deepspeed=zero1", "deepspeed.timeout_minutes=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "tests.reliability.enospc_train", "1", "4", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    tmp, kept = root / "step_00000004.tmp", root / "step_00000002"
    message = (f"{tmp}/zero_pp_rank_1_mp_rank_00_optim_states.pt: no space left on device while writing "
               f"checkpoint step 4 (")
    tail = f"); removed the partial {tmp}; the last good checkpoint {kept} is intact"
    for rank in range(2):
        # Rank 0 wrote its shards; it fails with rank 1's message (the ranks agreed), not in a collective's timeout.
        lines = [line for line in proc.stderr.splitlines() if line.startswith(f"llmsys: rank {rank}: ")]
        assert len(lines) == 1 and message in lines[0] and tail in lines[0], proc.stderr[-4000:]
    assert not tmp.exists()
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert verify_checkpoint(kept)["world_size"] == 2
