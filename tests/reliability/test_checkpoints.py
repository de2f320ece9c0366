"""Resuming reads checkpoints that may be damaged or tampered with: nothing in them runs, every fault is
named, and ``trainer.resume=auto`` finds the newest checkpoint that verifies (never a silent restart).

The real runs train the small model with ZeRO-0 and save at steps 2 and 4; each test tampers with a copy.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from llmsys.distributed import CheckpointError, latest_checkpoint, verify_checkpoint
from llmsys.distributed.engine import _WeightsOnlyReads, safe_load, write_manifest
from tests.trainers.helpers import train, train_losses

COMMON = ["trainer.eval_every=0", "trainer.save_every=2", "trainer.log_every=1", "trainer.keep_checkpoints=3",
          "trainer.global_batch_size=4", "trainer.micro_batch_size=2"]
SHARD = "mp_rank_00_model_states.pt"


class _Touch:
    """Unpickling it with weights_only=False creates ``marker``: the attack a checkpoint can carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _evil_file(path: Path, marker: Path) -> None:
    torch.save({"module": _Touch(marker)}, path)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(out, COMMON + ["trainer.max_steps=4"])
    return out


def _copy(finished: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out, out / "checkpoints"


def test_the_attack_is_real_and_every_reader_refuses_it(tmp_path):
    probe, marker = tmp_path / "probe_marker", tmp_path / "marker"
    _evil_file(tmp_path / "probe.pt", probe)
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()  # what DeepSpeed's own torch.load(weights_only=False) would have done
    _evil_file(tmp_path / "evil.pt", marker)
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    for read in (safe_load, _WeightsOnlyReads(TorchCheckpointEngine()).load):
        with pytest.raises(CheckpointError, match=r"evil\.pt: refused: .*io\.open"):
            read(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.slow
def test_every_file_of_a_real_checkpoint_passes_the_allow_list(finished):
    for pt in sorted((finished / "checkpoints" / "step_00000004").glob("*.pt")):
        assert safe_load(pt) is not None


@pytest.mark.slow
def test_malicious_shard_is_refused_by_a_real_resume_and_runs_nothing(finished, tmp_path):
    out, root = _copy(finished, tmp_path)
    step, marker = root / "step_00000004", tmp_path / "pwned"
    _evil_file(step / SHARD, marker)
    write_manifest(step)  # the attacker can rewrite the manifest too: the pickle scan still refuses it
    proc = train(out, COMMON + ["trainer.max_steps=6", f"trainer.resume={step}"], check=False)
    assert proc.returncode != 0
    assert f"{step / SHARD}: refused" in proc.stderr and "io.open" in proc.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_malicious_zero2_optimizer_state_is_refused_on_two_processes(tmp_path):
    out = tmp_path / "z2"
    common = COMMON + ["deepspeed=zero2"]
    train(out, common + ["trainer.max_steps=2"], nproc=2, launcher="torchrun")
    step, marker = out / "checkpoints" / "step_00000002", tmp_path / "pwned"
    optim = step / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert optim.is_file()
    _evil_file(optim, marker)
    write_manifest(step)
    proc = train(out, common + ["trainer.max_steps=4", "trainer.resume=auto"], nproc=2, launcher="torchrun",
                 check=False)
    assert proc.returncode != 0 and f"{optim}: refused" in proc.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_truncated_newest_shard_falls_back_to_the_previous_checkpoint(finished, tmp_path):
    out, root = _copy(finished, tmp_path)
    shard = root / "step_00000004" / SHARD
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = train(out, COMMON + ["trainer.max_steps=4", "trainer.resume=auto"])
    assert f"{shard}: " in proc.stderr and "truncated" in proc.stderr
    assert f"resuming from {root / 'step_00000002'}" in proc.stderr
    assert f"resumed from {root / 'step_00000002'} at step 2" in proc.stderr
    verify_checkpoint(root / "step_00000004")  # re-saved whole
    assert train_losses(out) == pytest.approx(train_losses(finished), rel=1e-6)


@pytest.mark.slow
def test_missing_latest_resumes_from_the_newest_checkpoint_and_keeps_the_others(finished, tmp_path):
    out, root = _copy(finished, tmp_path)
    (root / "latest").unlink()
    before = {p: _sha(p) for p in sorted(root.glob("step_*/*"))}
    proc = train(out, COMMON + ["trainer.max_steps=6", "trainer.resume=auto"])
    assert "latest: missing" in proc.stderr
    assert f"resumed from {root / 'step_00000004'} at step 4" in proc.stderr
    assert {p: _sha(p) for p in before} == before  # nothing pruned or overwritten
    assert sorted(train_losses(out)) == list(range(1, 7))


@pytest.mark.slow
def test_one_process_zero0_checkpoint_resumes_on_two_processes(finished, tmp_path):
    one, _ = _copy(finished, tmp_path / "one")
    two, _ = _copy(finished, tmp_path / "two")
    train(one, COMMON + ["trainer.max_steps=6", "trainer.resume=auto"])
    proc = train(two, COMMON + ["trainer.max_steps=6", "trainer.resume=auto"], nproc=2, launcher="torchrun")
    assert "restores rank 0's RNG state" in proc.stderr
    continued_one, continued_two = train_losses(one), train_losses(two)
    assert sorted(continued_two) == list(range(1, 7))
    for s in (5, 6):  # the same global batch, split over two ranks: the same numbers
        assert continued_two[s] == pytest.approx(continued_one[s], rel=1e-5), s


# -- damage found before anything is loaded (no training needed beyond the fixture) ---------------


@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [
    ("truncate", r"step_00000004/mp_rank_00_model_states\.pt: \d+ bytes, manifest\.json records \d+"),
    ("swap", r"step_00000004/mp_rank_00_model_states\.pt: its sha256 differs"),
    ("garbage_state", r"step_00000004/trainer_state\.json: (its sha256 differs|\d+ bytes)"),
    ("add", r"step_00000004/extra\.pt: not listed in manifest\.json"),
    ("no_manifest", r"step_00000004/manifest\.json: missing"),
])
def test_damage_is_named_and_auto_falls_back(finished, tmp_path, damage, message):
    _, root = _copy(finished, tmp_path)
    newest, older = root / "step_00000004", root / "step_00000002"
    if damage == "truncate":
        (newest / SHARD).write_bytes((newest / SHARD).read_bytes()[:100])
    elif damage == "swap":  # same size, other content: the previous checkpoint's shard
        shutil.copy(older / SHARD, newest / SHARD)
    elif damage == "garbage_state":
        (newest / "trainer_state.json").write_text("{not json")
    elif damage == "add":
        torch.save({}, newest / "extra.pt")
    else:
        (newest / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(newest)
    assert latest_checkpoint(root) == older
    shutil.rmtree(older)
    with pytest.raises(CheckpointError, match=message):  # nothing left to fall back to: stop, naming the file
        latest_checkpoint(root)


@pytest.mark.slow
@pytest.mark.parametrize("text, message", [
    ("{garbage", r"trainer_state\.json: not valid JSON"),
    ('{"step": "twenty", "world_size": 1, "zero_stage": 0}', r"trainer_state\.json: field 'step' must be an "
                                                             r"integer >= 0, found 'twenty'"),
    ('{"step": 4, "world_size": 1}', r"field 'zero_stage' must be an integer in \[0, 3\], found None"),
    ("[4]", r"trainer_state\.json: expected a JSON object, found list"),
])
def test_ill_typed_trainer_state_is_named_even_with_a_matching_manifest(finished, tmp_path, text, message):
    _, root = _copy(finished, tmp_path)
    newest = root / "step_00000004"
    (newest / "trainer_state.json").write_text(text)
    write_manifest(newest)
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(newest)


@pytest.mark.slow
def test_empty_rng_file_is_named(finished, tmp_path):
    _, root = _copy(finished, tmp_path)
    rng = root / "step_00000004" / "rng_rank0.pt"
    rng.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"rng_rank0\.pt: 0 bytes, manifest\.json records \d+"):
        verify_checkpoint(rng.parent)
    write_manifest(rng.parent)  # even if the manifest agrees, reading it gives a one-line error naming it
    with pytest.raises(CheckpointError, match=r"rng_rank0\.pt: cannot be read as a torch checkpoint file"):
        safe_load(rng)


def test_checkpoints_without_a_valid_one_never_restart_silently(tmp_path):
    (tmp_path / "latest").write_text("step_00000005\n")
    with pytest.raises(CheckpointError, match="step_00000005: missing"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "nothing_here") is None
    (tmp_path / "latest").write_text("../elsewhere\n")
    with pytest.raises(CheckpointError, match=r"latest: names '\.\./elsewhere', not a checkpoint tag"):
        latest_checkpoint(tmp_path)
    (tmp_path / "latest").unlink()
    (tmp_path / "step_00000003").mkdir()  # a directory without its manifest: never complete
    with pytest.raises(CheckpointError, match=r"step_00000003/manifest\.json: missing"):
        latest_checkpoint(tmp_path)
