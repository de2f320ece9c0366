"""The embedded arithmetic task (data=arith): deterministic bytes, correct answers, disjoint splits that SFT
and the prompt reader both honour, metadata for the rewards, the fixed location of the config."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from llmsys.config.schema import DataConfig
from llmsys.data import (
    arith_rows,
    embedded_arith_path,
    embedded_corpus_path,
    iter_conversations,
    load_prompts,
    load_sft_data,
    prepare_sft_data,
)
from llmsys.data import embedded_arith as arith_module
from llmsys.paths import corpus_path
from llmsys.rlhf.rewards import answer_format, exact_answer

_PROBLEM = re.compile(r"What is (\d+) ([+-]) (\d+)\?")


def _operands(prompt: str) -> tuple[int, str, int]:
    match = _PROBLEM.fullmatch(prompt)
    assert match, prompt
    return int(match[1]), match[2], int(match[3])


def _pair(row: dict) -> tuple:
    """The held-out unit: an addition's unordered pair, a subtraction's ordered one."""
    a, op, b = _operands(row["prompt"])
    return (op, *sorted((a, b))) if op == "+" else (op, a, b)


def test_same_seed_same_bytes_other_seed_other_rows(tmp_path):
    first, second = embedded_arith_path(tmp_path / "a"), embedded_arith_path(tmp_path / "b")
    assert first.name == "arith.jsonl" and first.read_bytes() == second.read_bytes()
    assert embedded_arith_path(tmp_path / "a") == first  # built once, then found
    assert arith_rows() == arith_rows()
    assert arith_rows(seed=1) != arith_rows()
    assert [json.loads(line) for line in first.read_text(encoding="utf-8").splitlines()] == arith_rows()


def test_every_problem_once_with_its_correct_answer():
    rows = arith_rows()
    assert len(rows) == 2_855 and len({row["prompt"] for row in rows}) == len(rows)
    assert Counter(row["op"] for row in rows) == {"+": 1_900, "-": 955}
    for row in rows:
        a, op, b = _operands(row["prompt"])
        assert 0 <= a <= 99 and 0 <= b <= 99 and op == row["op"]
        assert min(a, b) <= 9 if op == "+" else b <= 9  # one single-digit operand (the subtrahend)
        assert int(row["answer"]) == (a + b if op == "+" else a - b) >= 0
        assert row["response"] == row["answer"] == str(int(row["answer"]))
        assert set(row) == {"prompt", "response", "answer", "op", "split"}
    # The task's own rewards: every reference response is correct and well formed.
    prompts, responses = [row["prompt"] for row in rows], [row["response"] for row in rows]
    assert exact_answer(prompts, responses, rows) == [1.0] * len(rows)
    assert answer_format(prompts, responses, rows) == [1.0] * len(rows)


def test_splits_hold_out_whole_operand_pairs():
    rows = arith_rows()
    val = [row for row in rows if row["split"] == "val"]
    train = [row for row in rows if row["split"] == "train"]
    assert len(val) == 287 and len(train) == 2_568 and len(val) + len(train) == len(rows)
    assert not {row["prompt"] for row in val} & {row["prompt"] for row in train}
    val_pairs, train_pairs = {_pair(row) for row in val}, {_pair(row) for row in train}
    assert len(val_pairs) == 191 and not val_pairs & train_pairs  # "7 + 45" and "45 + 7" stay together
    assert Counter(row["op"] for row in val) == {"+": 194, "-": 93}  # both operations held out
    ordered = [row["split"] for row in rows[:100]]
    assert "val" in ordered and "train" in ordered  # rows are shuffled, not sorted by split


def test_held_out_problems_need_only_digit_rules_that_training_teaches():
    def rule(row: dict) -> tuple:  # what an answer's units digit and carry/borrow depend on
        a, op, b = _operands(row["prompt"])
        large, small = (max(a, b), min(a, b)) if op == "+" else (a, b)
        return op, large % 10, small

    train_rules = {rule(row) for row in arith_rows() if row["split"] == "train"}
    assert len(train_rules) == 200 and {rule(row) for row in arith_rows() if row["split"] == "val"} <= train_rules


def test_the_full_two_digit_task_is_a_setting_away():
    rows = arith_rows(small_max=99)
    assert len(rows) == 15_050 and Counter(row["op"] for row in rows) == {"+": 10_000, "-": 5_050}


def _subset_file(tmp_path: Path, write_jsonl, count: int = 120) -> tuple[Path, list[dict]]:
    rows = arith_rows()[:count]
    return write_jsonl(tmp_path / "arith.jsonl", rows), rows


def test_sft_reads_the_rows_and_keeps_their_split(tmp_path, tokenizer, write_jsonl):
    path, rows = _subset_file(tmp_path, write_jsonl)
    cfg = DataConfig(path=str(path), tokenizer=str(tokenizer.save(tmp_path / "tok")), seq_len=64,
                     cache_dir=str(tmp_path / "cache"))
    conversations = list(iter_conversations(cfg))
    assert conversations[0][1] == [
        {"role": "user", "content": rows[0]["prompt"]}, {"role": "assistant", "content": rows[0]["response"]}]
    data = load_sft_data(prepare_sft_data(cfg, tmp_path / "cache"))

    def prompts_of(split) -> list[str]:
        texts = [tokenizer.decode(split.raw(i)[0].tolist()) for i in range(len(split))]
        return [re.search(r"user\n(.*?)<\|im_end\|>", text)[1] for text in texts]

    assert sorted(prompts_of(data.val)) == sorted(row["prompt"] for row in rows if row["split"] == "val")
    assert sorted(prompts_of(data.train)) == sorted(row["prompt"] for row in rows if row["split"] == "train")
    # Not data.val_fraction's share: the rows' own split (about 10%).
    assert len(data.val) == sum(row["split"] == "val" for row in rows) != round(len(rows) * cfg.val_fraction)


def test_prompt_sets_keep_the_split_and_carry_the_metadata(tmp_path, tokenizer, write_jsonl):
    path, rows = _subset_file(tmp_path, write_jsonl)
    cfg = DataConfig(path=str(path), tokenizer=str(tokenizer.save(tmp_path / "tok")), seq_len=128)
    prompts = load_prompts(cfg, tokenizer)  # whole prompts: up to seq_len // 2 tokens
    by_prompt = {row["prompt"]: row for row in rows}
    for split in ("train", "val"):
        texts, meta, ids = (getattr(prompts, f"{split}_texts"), getattr(prompts, f"{split}_meta"),
                            getattr(prompts, split))
        assert len(texts) == len(meta) == len(ids) > 0
        assert sorted(texts) == sorted(row["prompt"] for row in rows if row["split"] == split)
        for text, fields, prompt_ids in zip(texts, meta, ids):
            assert fields == {"answer": by_prompt[text]["answer"], "op": by_prompt[text]["op"]}
            assert tokenizer.decode(prompt_ids) == f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    # What a reward sees: the texts and metadata of a split; the reference answers score 1.
    responses = [by_prompt[text]["response"] for text in prompts.val_texts]
    assert exact_answer(prompts.val_texts, responses, prompts.val_meta) == [1.0] * len(responses)


def test_config_names_the_arith_location_without_writing(tmp_path) -> None:
    script = ("from omegaconf import OmegaConf; from llmsys.config import register; register(); "
              "print(OmegaConf.create({'p': '${llmsys.corpus:arith}'}).p)")
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                         env={**os.environ, "LLMSYS_HOME": str(tmp_path / "llmsys_home")}).stdout.splitlines()
    assert out == [str(tmp_path / "llmsys_home" / "data" / "arith" / "arith.jsonl")]
    assert not (tmp_path / "llmsys_home").exists()


def test_arith_location_links_the_generated_file_once_read(tmp_path, tokenizer, monkeypatch) -> None:
    location = corpus_path("arith")
    assert not os.path.lexists(location)
    prompts = load_prompts(DataConfig(path=str(location)), tokenizer)
    generated = embedded_corpus_path("arith")
    assert location.is_symlink() and location.resolve() == generated.resolve()
    assert str(generated).startswith(str(tmp_path / "llmsys_home" / "data" / "arith"))
    assert (len(prompts.train), len(prompts.val)) == (2_568, 287)
    assert prompts.val_meta[0].keys() == {"answer", "op"}
    monkeypatch.setattr(arith_module, "ARITH_GENERATOR_VERSION", arith_module.ARITH_GENERATOR_VERSION + 1)
    assert embedded_corpus_path("arith") != generated  # a new generator writes a new file


def test_arith_rows_refuses_bad_settings():
    with pytest.raises(ValueError, match="val_fraction"):
        arith_rows(val_fraction=0.0)
    with pytest.raises(ValueError, match="small_max"):
        arith_rows(small_max=100)
