"""A finished pipeline stage is never silently reused after its settings change: the pipeline refuses
(status 2, one line naming each changed key, nothing run, the report untouched) or, with
``--rerun-changed``, trains the stage and every stage after it from scratch, its old run directories kept."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from llmsys.config import Config, to_yaml
from llmsys.pipeline import (
    REPLACED,
    RUN_CONFIG,
    SHOWN_CHARS,
    STAGES,
    changed_stages,
    compose_config,
    config_changes,
    consumers,
    describe_changes,
    final,
    move_aside,
    replace_changed,
    stage_overrides,
)
from tests.tools import missing_tool


def _saved(stage: str, out: Path, extra: Sequence[str] = ()) -> dict:
    """The config.yaml a run of ``stage`` in pipeline directory ``out`` saves, as it reads back."""
    return yaml.safe_load(to_yaml(compose_config(stage_overrides(STAGES[stage], out, 1.0, list(extra)))))


def _now(stage: str, out: Path, extra: Sequence[str] = ()) -> Config:
    """The config the pipeline would run ``stage`` of ``out`` with now."""
    return compose_config(stage_overrides(STAGES[stage], out, 1.0, list(extra)))


def test_the_same_settings_match_even_in_a_moved_pipeline_directory(tmp_path):
    saved = _saved("ppo", tmp_path / "old")
    assert saved["model"]["init_from"] == str(final(tmp_path / "old", "sft"))
    assert config_changes(saved, _now("ppo", tmp_path / "old"), tmp_path / "old") == []
    # Copied elsewhere: its inputs are the same stages' exports, relative to the new directory.
    assert config_changes(saved, _now("ppo", tmp_path / "new"), tmp_path / "new") == []
    # An input set by hand to a path outside the pipeline directory is a change.
    outside = str(tmp_path / "elsewhere" / "final")
    assert config_changes(saved, _now("ppo", tmp_path / "old", [f"ppo:ppo.reward_model={outside}"]),
                          tmp_path / "old") == [("ppo.reward_model", str(final(tmp_path / "old", "reward")), outside)]


def test_changed_settings_are_listed_in_schema_order_and_neutral_ones_are_not(tmp_path):
    saved = _saved("sft", tmp_path)
    neutral = ["logger.progress=false", "logger.wandb=true", "trainer.resume=none", "trainer.save_every=7",
               "trainer.keep_checkpoints=5", "trainer.peak_tflops=100", "deepspeed.timeout_minutes=3",
               "data.num_proc=1", f"data.cache_dir={tmp_path}"]
    assert config_changes(saved, _now("sft", tmp_path, neutral), tmp_path) == []
    now = _now("sft", tmp_path, ["sft:optim.lr=5e-4", "model.lora.targets=[wq]", "+deepspeed.extra.a=1",
                                 "trainer.log_every=3", *neutral])
    assert config_changes(saved, now, tmp_path) == [
        ("model.lora.targets", saved["model"]["lora"]["targets"], ["wq"]),
        ("optim.lr", saved["optim"]["lr"], 5e-4),
        ("trainer.log_every", saved["trainer"]["log_every"], 3),
        ("deepspeed.extra", {}, {"a": 1}),  # a free-form dict is compared whole
    ]
    # A setting the saved config lacks (added to llmsys after that run) is not compared.
    del saved["trainer"]["max_bad_steps"], saved["grpo"]
    assert config_changes(saved, _now("sft", tmp_path, ["trainer.max_bad_steps=9"]), tmp_path) == []
    # A section saved as something else than a mapping is compared whole.
    saved["dpo"] = 3
    assert config_changes(saved, now, tmp_path)[-1] == ("dpo", 3, _saved("sft", tmp_path)["dpo"])


def test_the_message_keeps_each_value_short_and_on_one_line():
    long_list = [f"layer{i}.proj" for i in range(30)]
    path_a, path_b = "/runs/" + "a" * 80 + "/sft/final", "/runs/" + "a" * 80 + "/dpo/final"
    text = describe_changes([("model.lora.targets", ["wq"], long_list), ("model.init_from", path_a, path_b),
                             ("data.path", "x\ny", None)])
    shown_list = text.split(" -> ", 1)[1].split(", model.init_from")[0]
    assert shown_list.startswith('["layer0.proj", ') and shown_list.endswith("… (30 items)")
    assert len(shown_list) <= SHOWN_CHARS + 20
    half = SHOWN_CHARS // 2
    assert f"model.init_from {path_a[:half]}…{path_a[-half:]} -> {path_b[:half]}…{path_b[-half:]}," in text
    assert 'data.path "x\\ny" -> null' in text and "\n" not in text
    many = describe_changes([(f"k{i}", i, i + 1) for i in range(10)])
    assert many.endswith("k5 5 -> 6, and 4 more")


def test_consumers_are_found_through_the_chain():
    assert consumers(STAGES, ["pretrain"]) == ["sft", "reward", "dpo", "ppo"]
    assert consumers(STAGES, ["sft"]) == ["reward", "dpo", "ppo"]
    assert consumers(STAGES, ["reward"]) == ["ppo"]
    assert consumers(STAGES, ["dpo", "ppo"]) == []


@pytest.mark.parametrize("content,problem", [(None, "missing"), ("model: [unclosed", "unreadable"),
                                             ("just text", "expected the config sections"),
                                             (b"\xff\xfe", "unreadable")])
def test_a_finished_stage_without_a_readable_saved_config_is_refused_naming_the_file(tmp_path, capsys, content,
                                                                                    problem):
    (final(tmp_path, "sft")).mkdir(parents=True)
    (final(tmp_path, "sft") / "config.json").write_text("{}")
    if content is not None:
        path = tmp_path / "sft" / RUN_CONFIG
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        changed_stages(STAGES, ["sft"], tmp_path, 1.0, [])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"llmsys.pipeline: stage sft: {tmp_path / 'sft' / RUN_CONFIG}: {problem}")
    assert "move" in line and str(tmp_path / "sft") in line


def test_an_interrupted_stage_is_not_compared_and_resumes(tmp_path):
    (tmp_path / "sft" / "checkpoints").mkdir(parents=True)
    (tmp_path / "sft" / RUN_CONFIG).write_text("garbage: [")  # never read: no final/ yet
    assert changed_stages(STAGES, ["sft"], tmp_path, 1.0, ["sft:optim.lr=1"]) == {}


def _run_dirs(out: Path, names: list[str]) -> None:
    for name in names:
        (out / name / "final").mkdir(parents=True)
        (out / name / "final" / "model.safetensors").write_text(name)


def test_a_refusal_moves_nothing_and_names_what_the_flag_would_do(tmp_path, capsys):
    _run_dirs(tmp_path, ["pretrain", "sft", "reward", "dpo"])
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        replace_changed(STAGES, ["pretrain", "sft", "dpo"], tmp_path, {"sft": [("optim.lr", 0.001, 0.0005)]},
                        rerun=False)
    assert exit_info.value.code == 2 and sorted(p.name for p in tmp_path.iterdir()) == before
    (line,) = capsys.readouterr().err.splitlines()
    assert "records: sft: optim.lr 0.001 -> 0.0005; nothing was run" in line
    assert "--rerun-changed to train sft and then dpo again from scratch" in line  # ppo: not selected, no run
    assert line.endswith("; reward, also trained from its export but not in --stages, would only be moved aside")


def test_the_flag_moves_the_changed_stage_and_every_stage_after_it_aside_whole(tmp_path):
    _run_dirs(tmp_path, ["pretrain", "sft", "reward", "dpo"])
    replace_changed(STAGES, ["pretrain", "sft", "dpo"], tmp_path, {"sft": [("optim.lr", 0.001, 0.0005)]},
                    rerun=True)
    assert sorted(p.name for p in tmp_path.iterdir() if REPLACED not in p.name) == ["pretrain"]
    for name in ("sft", "reward", "dpo"):  # reward too: not selected, but trained from the replaced export
        (kept,) = tmp_path.glob(f"{name}.{REPLACED}-*")
        assert (kept / "final" / "model.safetensors").read_text() == name
    # Twice in the same second: a second, unused name.
    (tmp_path / "x").mkdir()
    first = move_aside(tmp_path / "x")
    (tmp_path / "x").mkdir()
    second = move_aside(tmp_path / "x")
    assert first.is_dir() and second.is_dir() and first != second and not (tmp_path / "x").exists()


# -- real pipeline runs ----------------------------------------------------------------------------

RUN = ["--stages", "pretrain,sft,dpo", "--probe-prompts", "2", "--max-new-tokens", "4",
       "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
       "model.max_seq_len=128", "data.seq_len=128", "data.bpe_vocab_size=512", "logger.progress=false",
       "trainer.global_batch_size=4", "trainer.micro_batch_size=4", "trainer.eval_samples=8",
       "trainer.log_every=1", "pretrain:trainer.max_steps=3", "sft:trainer.max_steps=2",
       "dpo:trainer.max_steps=2"]


def _pipeline(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "llmsys.pipeline", "--out", str(out), *RUN, *extra],
                          check=False, capture_output=True, text=True, env=env, timeout=900)


def _exports(out: Path) -> dict[str, int]:
    return {name: (final(out, name) / "model.safetensors").stat().st_mtime_ns for name in ("pretrain", "sft", "dpo")}


def _tree(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*"))}


@pytest.mark.slow
def test_a_changed_finished_stage_is_refused_then_retrained_with_the_flag_with_the_stages_after_it(tmp_path):
    if importlib.util.find_spec("chatterbot_corpus") is None:
        missing_tool("pip install --no-deps chatterbot-corpus (the embedded SFT data)")
    out = tmp_path / "pipeline"
    first = _pipeline(out)
    assert first.returncode == 0, first.stderr[-4000:]
    trained, tree = _exports(out), _tree(out)
    report = {name: (out / name).read_bytes() for name in ("report.json", "report.md")}
    old_lr = yaml.safe_load((out / "sft" / RUN_CONFIG).read_text())["optim"]["lr"]
    assert old_lr != 5e-4

    # Changed: refused before anything runs, the report and every file as they were.
    refused = _pipeline(out, "sft:optim.lr=5e-4")
    assert refused.returncode == 2, refused.stderr[-4000:]
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("llmsys.pipeline:")]
    assert f"sft: optim.lr {json.dumps(old_lr)} -> {json.dumps(5e-4)};" in line, line
    assert "--rerun-changed" in line and "dpo" in line and "pretrain" not in line.split("records:")[1], line
    assert "Traceback" not in refused.stderr and "exists, skipping" not in refused.stderr
    assert {name: (out / name).read_bytes() for name in report} == report
    assert _tree(out) == tree

    # With the flag: sft and dpo (trained from sft's export) train again; pretrain is left alone; the old
    # run directories are renamed, whole.
    rerun = _pipeline(out, "sft:optim.lr=5e-4", "--rerun-changed")
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    retrained = _exports(out)
    assert retrained["pretrain"] == trained["pretrain"]
    assert retrained["sft"] != trained["sft"] and retrained["dpo"] != trained["dpo"]
    assert rerun.stderr.count("exists, skipping") == 1
    for name in ("sft", "dpo"):
        (kept,) = out.glob(f"{name}.{REPLACED}-*")
        assert (final(out, kept.name) / "model.safetensors").stat().st_mtime_ns == trained[name]
        assert f"{name}: " in rerun.stderr and f"moved to {kept}" in rerun.stderr
    (kept_sft,) = out.glob(f"sft.{REPLACED}-*")
    assert yaml.safe_load((kept_sft / RUN_CONFIG).read_text())["optim"]["lr"] == old_lr
    assert not list(out.glob(f"pretrain.{REPLACED}-*"))
    assert yaml.safe_load((out / "sft" / RUN_CONFIG).read_text())["optim"]["lr"] == 5e-4
    assert json.loads((out / "report.json").read_text())["command"].endswith("sft:optim.lr=5e-4 --rerun-changed")

    # The same settings again: everything is skipped, nothing moves.
    tree = _tree(out)
    again = _pipeline(out, "sft:optim.lr=5e-4")
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stderr.count("exists, skipping") == 3 and "moved to" not in again.stderr
    assert _exports(out) == retrained
    assert {p for p in _tree(out) if REPLACED in p} == {p for p in tree if REPLACED in p}
