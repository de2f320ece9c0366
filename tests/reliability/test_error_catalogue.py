"""The catalogue of bad inputs: config values, data files, models and tokenizers, damaged checkpoints. Each
is given to a real ``python -m llmsys.train`` and must end in exit status 2 with one line on stderr that
names the key, file, line or field at fault - never a traceback - and must leave a good checkpoint as it was."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.trainers.helpers import SMALL, train

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
PRETRAIN = [*SMALL, "stage=pretrain", "trainer.eval_every=0", "trainer.log_every=1"]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    """A finished 2-step run: ``checkpoints/step_00000002`` and the export ``final/``."""
    out = tmp_path_factory.mktemp("catalogue") / "good"
    train(out, ["stage=pretrain", "trainer.max_steps=2", "trainer.save_every=2", "trainer.eval_every=0"])
    return out


@dataclass
class Case:
    make: Callable[[Path, Path], list[str]]  # (case dir, good run) -> overrides; may write files
    expect: tuple[str, ...]  # each must appear in the error line (with {dir} and {run} filled in)
    damages_checkpoint: bool = False


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _copy_run(tmp: Path, good: Path) -> Path:
    run = tmp / "run"
    shutil.copytree(good, run, ignore=shutil.ignore_patterns(".lock"))
    return run


def _ckpt(run: Path) -> Path:
    return run / "checkpoints" / "step_00000002"


def _resume(tmp: Path, good: Path, damage: Callable[[Path], None], *extra: str) -> list[str]:
    run = _copy_run(tmp, good)
    damage(_ckpt(run))
    return [f"trainer.output_dir={run}", *PRETRAIN, "trainer.max_steps=4", *extra]


def _plain(*overrides: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, good: [f"trainer.output_dir={tmp / 'run'}", *PRETRAIN, *overrides]


def _sft_file(text: str, name: str = "chat.jsonl") -> Callable[[Path, Path], list[str]]:
    def make(tmp: Path, good: Path) -> list[str]:
        path = _write(tmp / name, text)
        return [f"trainer.output_dir={tmp / 'run'}", *SMALL, "stage=sft", "data=chat", f"data.path={path}",
                f"model.init_from={good / 'final'}", "trainer.max_steps=2"]
    return make


def _prefs_file(text: str) -> Callable[[Path, Path], list[str]]:
    def make(tmp: Path, good: Path) -> list[str]:
        path = _write(tmp / "prefs.jsonl", text)
        return [f"trainer.output_dir={tmp / 'run'}", *SMALL, "stage=dpo", "data=prefs", f"data.path={path}",
                f"model.init_from={good / 'final'}", "trainer.max_steps=2"]
    return make


def _corpus(make_files: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    def make(tmp: Path, good: Path) -> list[str]:
        corpus = tmp / "corpus"
        corpus.mkdir()
        make_files(corpus)
        return [f"trainer.output_dir={tmp / 'run'}", *PRETRAIN, "data=files", f"data.path={corpus}",
                f"data.cache_dir={tmp / 'cache'}"]
    return make


def _init_from(prepare: Callable[[Path, Path], Path], *extra: str) -> Callable[[Path, Path], list[str]]:
    def make(tmp: Path, good: Path) -> list[str]:
        return [f"trainer.output_dir={tmp / 'run'}", *SMALL, "stage=sft", "data=chat",
                f"model.init_from={prepare(tmp, good)}", "trainer.max_steps=2", *extra]
    return make


def _export_copy(tmp: Path, good: Path) -> Path:
    export = tmp / "export"
    shutil.copytree(good / "final", export)
    return export


def _bad_export_config(tmp: Path, good: Path) -> Path:
    export = _export_copy(tmp, good)
    (export / "config.json").write_text("{not json")
    return export


def _export_without_weights(tmp: Path, good: Path) -> Path:
    export = _export_copy(tmp, good)
    (export / "model.safetensors").unlink()
    return export


def _truncated_export_weights(tmp: Path, good: Path) -> Path:
    export = _export_copy(tmp, good)
    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return export


def _other_tokenizer(tmp: Path, good: Path) -> Path:
    # A tokenizer with a larger vocabulary than the model's embedding: ids the model cannot embed.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    words = [f"w{i} x{i * 7} y{i * 13}" for i in range(3000)]
    tok.train_from_iterator(words, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>"]))
    export = _export_copy(tmp, good)
    tok.save(str(export / "tokenizer.json"))
    return export


def _truncate(name: str) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        shard = ckpt / name
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return damage


def _trainer_state(text: str) -> Callable[[Path], None]:
    return lambda ckpt: (ckpt / "trainer_state.json").write_text(text)


def _malicious(ckpt: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {ckpt.parent / 'PWNED'}",))

    (ckpt / "rng_rank0.pt").write_bytes(pickle.dumps({"torch": Payload()}))


def _no_latest_and_damaged(ckpt: Path) -> None:
    (ckpt.parent / "latest").unlink()
    _truncate("mp_rank_00_model_states.pt")(ckpt)


def _latest_garbage(ckpt: Path) -> None:
    (ckpt.parent / "latest").write_text("yesterday\n")
    shutil.rmtree(ckpt)


MODEL_SHARD = "mp_rank_00_model_states.pt"
CASES: dict[str, Case] = {
    # -- config values ------------------------------------------------------------------------------
    "negative_max_steps": Case(_plain("trainer.max_steps=-1"), ("trainer.max_steps",)),
    "zero_lr": Case(_plain("optim.lr=0"), ("optim.lr",)),
    "unknown_schedule": Case(_plain("optim.schedule=wavy"), ("optim.schedule", "wavy")),
    "unknown_precision": Case(_plain("trainer.precision=fp8"), ("trainer.precision", "fp8")),
    "zero_stage_5": Case(_plain("deepspeed.stage=5"), ("deepspeed.stage",)),
    "indivisible_batch": Case(_plain("trainer.global_batch_size=10", "trainer.micro_batch_size=4"),
                              ("trainer.global_batch_size", "trainer.micro_batch_size")),
    "misspelt_key": Case(_plain("trainer.max_step=5"), ("trainer.max_step",)),
    "not_a_number": Case(_plain("model.dim=wide"), ("model.dim", "wide")),
    "sequence_longer_than_model": Case(_plain("data.seq_len=128"), ("data.seq_len", "128", "max_seq_len")),
    "resume_from_nowhere": Case(_plain("trainer.resume=/nonexistent/step_9"), ("trainer.resume", "/nonexistent/step_9")),
    # -- data files ---------------------------------------------------------------------------------
    "corpus_path_missing": Case(_plain("data=files", "data.path=/nonexistent/corpus"), ("/nonexistent/corpus",)),
    "corpus_without_text_files": Case(_corpus(lambda d: (d / "image.png").write_bytes(b"\x89PNG")), ("{dir}/corpus",)),
    "corpus_not_utf8": Case(_corpus(lambda d: (d / "bad.txt").write_bytes(b"ok\n\xff\xfe\xfa broken")), ("bad.txt",)),
    "corpus_jsonl_bad_line": Case(_corpus(lambda d: _write(d / "rows.jsonl", '{"text": "a"}\n{"text": "b"}\n{oops\n')),
                                  ("rows.jsonl", "3")),
    "corpus_jsonl_missing_field": Case(_corpus(lambda d: _write(d / "rows.jsonl", '{"body": "a"}\n')),
                                       ("rows.jsonl", "text")),
    "sft_bad_json_line": Case(_sft_file('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response"\n'),
                              ("chat.jsonl", "2")),
    "sft_missing_response": Case(_sft_file('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n'),
                                 ("chat.jsonl", "2", "response")),
    "sft_wrong_role": Case(_sft_file('{"messages": [{"role": "robot", "content": "hi"}]}\n'),
                           ("chat.jsonl", "robot")),
    "prefs_same_texts": Case(_prefs_file('{"prompt": "p", "chosen": "x", "rejected": "x"}\n'),
                             ("prefs.jsonl", "same text")),
    "prefs_missing_rejected": Case(_prefs_file('{"prompt": "p", "chosen": "x"}\n'), ("prefs.jsonl", "rejected")),
    "tokenizer_missing": Case(_plain("data.tokenizer=/nonexistent/tok"), ("/nonexistent/tok",)),
    # -- models and tokenizers ----------------------------------------------------------------------
    "init_from_missing": Case(_init_from(lambda tmp, good: Path("/nonexistent/model")), ("/nonexistent/model",)),
    "init_from_bad_config": Case(_init_from(_bad_export_config), ("{dir}/export/config.json",)),
    "init_from_no_weights": Case(_init_from(_export_without_weights), ("{dir}/export",)),
    "init_from_truncated_weights": Case(_init_from(_truncated_export_weights), ("model.safetensors",)),
    "tokenizer_larger_than_model": Case(_init_from(_other_tokenizer), ("vocab",)),
    # -- damaged checkpoints (the only one there, so nothing to fall back to) -------------------------
    "checkpoint_truncated_shard": Case(lambda tmp, good: _resume(tmp, good, _truncate(MODEL_SHARD)),
                                       (MODEL_SHARD,), True),
    "checkpoint_state_garbage": Case(lambda tmp, good: _resume(tmp, good, _trainer_state("{garbage")),
                                     ("trainer_state.json",), True),
    "checkpoint_step_not_a_number": Case(lambda tmp, good: _resume(tmp, good, _trainer_state('{"step": "twenty"}')),
                                         ("trainer_state.json", "step"), True),
    "checkpoint_rng_empty": Case(lambda tmp, good: _resume(tmp, good, lambda c: (c / "rng_rank0.pt").write_bytes(b"")),
                                 ("rng_rank0.pt",), True),
    "checkpoint_malicious_pickle": Case(lambda tmp, good: _resume(tmp, good, _malicious), ("rng_rank0.pt",), True),
    "checkpoint_no_latest_damaged": Case(lambda tmp, good: _resume(tmp, good, _no_latest_and_damaged),
                                         (MODEL_SHARD,), True),
    "checkpoint_latest_garbage": Case(lambda tmp, good: _resume(tmp, good, _latest_garbage), ("latest", "yesterday")),
    "resume_changed_data": Case(lambda tmp, good: _resume(tmp, good, lambda c: None, "data.seq_len=16"),
                                ("data.seq_len", "32", "16")),
    "resume_changed_seed": Case(lambda tmp, good: _resume(tmp, good, lambda c: None, "trainer.seed=7"),
                                ("trainer.seed",)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_ends_in_one_line_naming_what_is_wrong(name, tmp_path, good_run):
    case = CASES[name]
    overrides = case.make(tmp_path, good_run)
    run = next((Path(o.split("=", 1)[1]) for o in overrides if o.startswith("trainer.output_dir=")), None)
    before = {}
    if case.damages_checkpoint and run is not None:
        before = {p.relative_to(run): p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "llmsys.train", *overrides], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)

    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-6000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-6000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llmsys:") or "invalid config:" in line
              or "Could not override" in line or "Key '" in line]
    assert len(errors) == 1, proc.stderr[-6000:]
    for expected in case.expect:
        expected = expected.format(dir=tmp_path, run=run)
        assert expected in errors[0], f"{expected!r} not in: {errors[0]}"
    if before:  # nothing good lost: the checkpoint files are as they were, none added or removed
        after = {p.relative_to(run): p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
        assert after == before
    if name == "checkpoint_malicious_pickle":
        assert not (run / "checkpoints" / "PWNED").exists()

