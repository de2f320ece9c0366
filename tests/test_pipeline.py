"""llmsys.pipeline: the stages chained end to end, and what SFT measurably changes (the format/stop probe)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from llmsys.data import (
    chat_template_for,
    data_cache_root,
    load_sft_data,
    prepare_sft_data,
)
from llmsys.eval import RuleAnnotator
from llmsys.eval.probes import held_out_prompts, load_export
from llmsys.pipeline import (
    DEFAULT_RECIPE,
    SIDE_BY_SIDE_FILE,
    STAGES,
    compose_config,
    for_stage,
    load_recipe,
    md_text,
    parse_args,
    stage_command,
    write_report,
)
from tests.conftest import PIPELINE_OVERRIDES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_stage_scoped_overrides_reach_only_their_stage():
    extra = ["model.dim=128", "sft:trainer.max_steps=7", "pretrain:optim.lr=1e-2", "data.path=/a:b"]
    assert for_stage("sft", extra) == ["model.dim=128", "trainer.max_steps=7", "data.path=/a:b"]
    assert for_stage("pretrain", extra) == ["model.dim=128", "optim.lr=1e-2", "data.path=/a:b"]


def test_stage_command_chains_exports_and_later_overrides_win(tmp_path):
    cmd = stage_command(STAGES["sft"], tmp_path, 0.5, ["sft:trainer.max_steps=9"], nproc=1)
    assert cmd[1:3] == ["-m", "llmsys.train"]
    assert f"model.init_from={tmp_path / 'pretrain' / 'final'}" in cmd
    assert f"trainer.output_dir={tmp_path / 'sft'}" in cmd and "stage=sft" in cmd and "data=chat" in cmd
    steps = [a for a in cmd if a.startswith("trainer.max_steps=")]
    assert steps == [f"trainer.max_steps={-(-STAGES['sft'].steps // 2)}", "trainer.max_steps=9"]  # Hydra: last wins
    cmd = stage_command(STAGES["pretrain"], tmp_path, 1.0, [], nproc=2)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]


@pytest.mark.parametrize("argv,message", [
    (["--stages", "pretrain,nope"], "unknown nope"),
    (["grpo:trainer.max_steps=1"], "not a stage"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_sft_loss_falls_and_the_model_learns_to_answer_and_stop(pipeline_run):
    report = json.loads((pipeline_run / "report.json").read_text())
    base, sft = report["stages"]["pretrain"], report["stages"]["sft"]
    assert base["metrics"]["steps"] == 200 and sft["metrics"]["steps"] == 300
    m = sft["metrics"]
    assert m["train_loss"] < m["train_loss_first"] - 1.0, m  # measured 4.80 -> 1.60
    assert m["val_loss"] < m["val_loss_first"] - 1.0, m  # measured 5.82 -> 3.08
    before, after = base["probes"]["format_stop"], sft["probes"]["format_stop"]
    assert before["n"] == after["n"] >= 20  # the same held-out prompts for both models
    # Measured: base stops 0.00 (rambles to the 48-token limit), SFT 0.87 (answers ~19 tokens, then <|im_end|>).
    assert before["both"] <= 0.1, before
    assert after["both"] >= before["both"] + 0.5, after
    assert after["mean_length"] < before["mean_length"] - 10, (before, after)
    table = (pipeline_run / "report.md").read_text()
    assert "| pretrain | 200 |" in table and "| sft | 300 |" in table


@pytest.mark.slow
def test_report_shows_the_stages_side_by_side_and_links_its_plots(pipeline_run):
    report = json.loads((pipeline_run / "report.json").read_text())
    table = (pipeline_run / "report.md").read_text()
    assert list(report["plots"]) == ["loss", "preference_accuracy", "online_rl", "probes"]
    for entry in report["plots"].values():  # every stage ran, so every figure has its metrics
        assert f"]({entry['file']})" in table, entry
        assert (pipeline_run / entry["file"]).read_bytes()[:8] == PNG_SIGNATURE
    assert report["side_by_side"] == {"file": SIDE_BY_SIDE_FILE}
    comparison = json.loads((pipeline_run / SIDE_BY_SIDE_FILE).read_text())
    assert comparison["stages"] == [name for name in STAGES if name != "reward"]  # a reward model does not answer
    assert comparison["score_name"] == "annotator" and comparison["max_new_tokens"] == report["max_new_tokens"]
    # The first held-out prompts of the format/stop probe, the same for every stage.
    samples = report["stages"]["sft"]["probes"]["format_stop"]["samples"]
    assert len(comparison["prompts"]) == load_recipe(DEFAULT_RECIPE).side_by_side_prompts > len(samples)
    assert comparison["prompts"][:len(samples)] == [s["prompt"] for s in samples]
    annotator = RuleAnnotator()
    for stage in comparison["stages"]:
        answers = comparison["answers"][stage]
        assert len(answers) == len(comparison["prompts"])
        for prompt, answer in zip(comparison["prompts"], answers):
            assert 1 <= answer["tokens"] <= comparison["max_new_tokens"]
            assert answer["score"] == annotator.score(prompt, answer["response"], answer["stopped"])
        assert f"| {stage} | {md_text(answers[0]['response'])} | {answers[0]['tokens']} |" in table
    # What the stage table measures shows in the answers: the base rambles to the limit, SFT stops.
    assert not any(a["stopped"] for a in comparison["answers"]["pretrain"])
    assert any(a["stopped"] for a in comparison["answers"]["sft"])
    assert "## Stages side by side" in table and "## Plots" in table


def _small_report(tmp_path) -> dict:
    metrics = {"steps": 3, "train_loss_first": 2.0, "train_loss": 1.0, "val_loss_first": None, "val_loss": None}
    probe = {"n": 1, "stopped": 1.0, "well_formed": 1.0, "both": 1.0, "mean_length": 3.0, "annotator_score": 0.5,
             "samples": [{"prompt": "hi | there", "answer": "<b>bold</b><|im_end|>"}]}
    return {"command": "python -m llmsys.pipeline", "out": str(tmp_path), "max_new_tokens": 8,
            "stages": {"sft": {"seconds": 1.0, "export": "x", "metrics": metrics, "probes": {"format_stop": probe}},
                       "dpo": {"seconds": 1.0, "export": "y", "metrics": metrics, "probes": {}}},
            "side_by_side": {"file": SIDE_BY_SIDE_FILE},
            "plots": {"loss": {"title": "Loss per stage", "file": "plots/loss.png"},
                      "online_rl": {"title": "PPO reward", "omitted": "no ppo or grpo stage logged reward_mean or kl"}}}


def test_report_shows_model_output_as_text_never_as_markup(tmp_path):
    report = _small_report(tmp_path)
    comparison = {"max_new_tokens": 8, "score_name": "annotator", "prompts": ["say | <i>hi</i>"],
                  "stages": ["sft", "dpo"],
                  "answers": {"sft": [{"response": "a | b <script>alert(1)</script>\nnext\r\n`code` *x* [l](u)",
                                       "tokens": 9, "stopped": False, "format_ok": True, "score": -1.25}],
                              "dpo": [{"response": " \n", "tokens": 2, "stopped": True, "format_ok": False,
                                       "score": -3.0}]}}
    write_report(tmp_path, report, comparison)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    text = (tmp_path / "report.md").read_text()
    assert not re.search(r"<(script|i|b)>", text)
    sft = next(line for line in text.splitlines() if line.startswith("| sft | a"))
    assert len(re.findall(r"(?<!\\)\|", sft)) == 7  # six cells: the answer's own bar is escaped
    assert ("| sft | a \\| b &lt;script&gt;alert(1)&lt;/script&gt;<br>next<br>\\`code\\` \\*x\\* \\[l\\](u) | 9 | no | yes"
            " | -1.25 |") == sft
    assert "| dpo | *(empty)* | 2 | yes | no | -3.00 |" in text
    assert "**1.** say \\| &lt;i&gt;hi&lt;/i&gt;" in text
    assert "&lt;b&gt;bold&lt;/b&gt;" in text  # the probe's examples too
    assert "![Loss per stage](plots/loss.png)" in text
    assert "- PPO reward: left out, no ppo or grpo stage logged reward_mean or kl." in text
    assert not list(tmp_path.glob("*.tmp"))


def test_a_left_out_side_by_side_says_why(tmp_path):
    report = dict(_small_report(tmp_path), side_by_side={"omitted": "pipeline.side_by_side_prompts is 0"})
    write_report(tmp_path, report)
    text = (tmp_path / "report.md").read_text()
    assert "## Stages side by side\n\nLeft out: pipeline.side_by_side_prompts is 0." in text


def test_a_verifiable_recipe_compares_on_held_out_problems_scored_by_the_exact_answer(tmp_path):
    import torch

    from llmsys.config import ModelConfig
    from llmsys.data import load_prompts, train_bpe_tokenizer
    from llmsys.models import Transformer
    from llmsys.models.export import save_pretrained
    from llmsys.pipeline import ProbeContext, compare_stages, final
    from llmsys.rlhf.rewards import exact_answer

    tokenizer = train_bpe_tokenizer(["What is 45 + 7? 52. What is 3 - 1? 2."] * 20, 300)
    tokenizer_dir = tokenizer.save(tmp_path / "tokenizer")
    cfg = ModelConfig(name="t", vocab_size=320, pad_vocab_multiple=32, dim=32, n_layers=1, n_heads=2, ffn_dim=64,
                      max_seq_len=64)
    for seed, name in enumerate(("pretrain", "sft")):
        torch.manual_seed(seed)
        save_pretrained(Transformer(cfg).state_dict(), cfg, final(tmp_path, name), tokenizer_dir=tokenizer_dir)
    recipe = load_recipe("verifiable")
    ctx = ProbeContext(recipe.by_name(), [], 4, "cpu", 6)
    comparison, why_not = compare_stages(tmp_path, ["pretrain", "sft"], 3, ctx)
    assert why_not == "" and comparison["stages"] == ["pretrain", "sft"]
    held_out = load_prompts(ctx.stage_data("sft"), tokenizer)  # the exact_answer probe's problems
    assert comparison["prompts"] == held_out.val_texts[:3]
    assert [m[-1]["content"] for m in held_out.val_messages] == held_out.val_texts
    assert comparison["score_name"] == "exact_answer"
    for answers in comparison["answers"].values():
        texts = [a["response"] for a in answers]
        assert [a["score"] for a in answers] == exact_answer(comparison["prompts"], texts, held_out.val_meta[:3])
    off = (None, "pipeline.side_by_side_prompts is 0 in the recipe")
    assert compare_stages(tmp_path, ["pretrain", "sft"], 0, ctx) == off


@pytest.mark.parametrize("raw,shown", [
    ("plain text.", "plain text."),
    ("x\u2028y\x85z\rw", "x<br>y<br>z<br>w"),
    ("bell\x07 & $5", "bell\ufffd &amp; \\$5"),
    ("<|im_end|>", "&lt;\\|im\\_end\\|&gt;"),
    ("back\\slash", "back\\\\slash"),
])
def test_md_text_escapes_markdown_html_and_line_breaks(raw, shown):
    assert md_text(raw) == shown


@pytest.mark.slow
def test_probe_prompts_are_held_out_and_shared(base_export, sft_export):
    base, base_tok = load_export(base_export)
    sft, sft_tok = load_export(sft_export)
    assert not base.training and not sft.training and base_tok.fingerprint == sft_tok.fingerprint
    data_cfg = compose_config(["stage=sft", "data=chat", *for_stage("sft", PIPELINE_OVERRIDES)]).data
    prompts = held_out_prompts(data_cfg, sft_tok, 10)
    assert len(prompts) == 10 and prompts == held_out_prompts(data_cfg, base_tok, 10)
    assert all(p[-1]["role"] == "user" for p in prompts)
    # No training example begins with a held-out prompt (the generation prompt ends with the assistant header).
    cache = load_sft_data(prepare_sft_data(data_cfg, data_cache_root(data_cfg), tokenizer=sft_tok))
    template = chat_template_for(sft_tok, data_cfg.chat_template)
    train = [cache.train.raw(i)[0].tolist() for i in range(len(cache.train))]
    for prompt in prompts:
        ids = template.generation_prompt(prompt)
        assert not any(example[:len(ids)] == ids for example in train), prompt


@pytest.mark.slow
def test_rerun_skips_finished_stages(pipeline_run, tmp_path):
    out = tmp_path / "pipeline"
    shutil.copytree(pipeline_run, out)
    before = {name: (out / name / "final" / "model.safetensors").stat().st_mtime_ns for name in STAGES}
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "llmsys.pipeline", "--out", str(out), "--probe-prompts", "4",
                           *PIPELINE_OVERRIDES], check=False, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("exists, skipping") == len(STAGES)
    assert before == {name: (out / name / "final" / "model.safetensors").stat().st_mtime_ns for name in STAGES}
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["sft"]["probes"]["format_stop"]["n"] == 4
    assert report["stages"]["sft"]["seconds"] is not None  # carried over from the first run


# The stage commands of the default recipe exactly as the code before the recipe moved to
# configs/experiment/pipeline.yaml produced them (issue #10): same overrides, same order, so no number moves.
PINNED_COMMANDS = {
    "pretrain": ["stage=pretrain", "trainer.output_dir={out}/pretrain", "trainer.max_steps=200",
                 "trainer.resume=auto", "data=shakespeare"],
    "sft": ["stage=sft", "trainer.output_dir={out}/sft", "trainer.max_steps=100", "trainer.resume=auto",
            "data=chat", "optim.warmup_steps=10", "model.init_from={out}/pretrain/final"],
    "reward": ["stage=reward", "trainer.output_dir={out}/reward", "trainer.max_steps=100", "trainer.resume=auto",
               "data=prefs", "optim.lr=3e-4", "optim.warmup_steps=10", "model.init_from={out}/sft/final"],
    "dpo": ["stage=dpo", "trainer.output_dir={out}/dpo", "trainer.max_steps=100", "trainer.resume=auto",
            "data=prefs", "optim.lr=1e-4", "optim.warmup_steps=5", "dpo.beta=0.5", "dpo.nll_weight=1.0",
            "model.init_from={out}/sft/final"],
    "ppo": ["stage=ppo", "trainer.output_dir={out}/ppo", "trainer.max_steps=40", "trainer.resume=auto",
            "data=prefs", "optim.lr=2e-4", "optim.warmup_steps=2", "ppo.adaptive_kl=true", "ppo.kl_target=6",
            "ppo.init_kl_coef=0.2", "ppo.kl_horizon=320", "ppo.max_new_tokens=32", "trainer.save_every=20",
            "model.init_from={out}/sft/final", "ppo.reward_model={out}/reward/final"],
}


def test_default_recipe_stage_commands_are_pinned(tmp_path):
    assert list(STAGES) == list(PINNED_COMMANDS)
    for name, expected in PINNED_COMMANDS.items():
        cmd = stage_command(STAGES[name], tmp_path, 1.0, [], nproc=1)
        assert cmd == [sys.executable, "-m", "llmsys.train", *(a.format(out=tmp_path) for a in expected)], name
    # Scaled steps round up; the user's overrides (plain, then this stage's) come last.
    cmd = stage_command(STAGES["ppo"], tmp_path, 0.2, ["x.y=1", "ppo:a.b=2", "sft:c=3"], nproc=1)
    expected = [a.format(out=tmp_path) for a in PINNED_COMMANDS["ppo"]]
    assert cmd[3:] == [expected[0], expected[1], "trainer.max_steps=8", *expected[3:], "x.y=1", "a.b=2"]


def test_recipe_option_selects_the_file_and_names_the_output():
    args, rest = parse_args(["--recipe", "pipeline", "--stages", "sft,dpo", "dpo:dpo.beta=1"])
    assert args.recipe == "pipeline" and args.stages == ["sft", "dpo"] and rest == ["dpo:dpo.beta=1"]
    assert args.out.parts == ("outputs", "pipeline")
    assert parse_args([])[0].stages == list(PINNED_COMMANDS)


@pytest.mark.parametrize("recipe,message", [("nope", "no configs/experiment/nope.yaml"),
                                            ("shakespeare_tiny", "no pipeline section")])
def test_unknown_or_training_recipe_is_refused(recipe, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--recipe", recipe])
    assert message in capsys.readouterr().err
