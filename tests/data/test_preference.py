"""Preference data: both row forms, K-wise expansion, bad input, tokens, collation, overflow, cache, split."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llmsys.config.schema import DataConfig
from llmsys.data import (
    IGNORE_INDEX,
    DataError,
    collate_pairs,
    embedded_corpus_path,
    iter_preference_rows,
    load_preference_data,
    load_prompts,
    prepare_preference_data,
)
from llmsys.data import embedded_prefs as preference_module
from llmsys.data.preference import fit_pair, response_ids, row_to_pairs
from llmsys.data.templates import ChatMLTemplate
from llmsys.rlhf import RuleAnnotator, words

def _cfg(path: Path, tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("seq_len", 64)
    kw.setdefault("val_fraction", 0.2)
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def _rows(n: int) -> list[dict]:
    """Pair rows and K-wise rows alternating, each prompt twice (once per form), far apart."""
    rows = []
    for i in range(n):
        rows.append({"prompt": f"Question {i}: how are you?", "chosen": f"Fine {i}.", "rejected": "Go away"})
    for i in range(n):
        rows.append({"prompt": f"Question {i}: how are you?", "responses": ["ok", f"I am fine {i}.", "no no no"],
                     "ranking": [1, 0, 2], "annotator": "test"})
    return rows


# -- rows ------------------------------------------------------------------------------------------


def test_pair_row_with_text_prompt_and_system():
    (pair,) = row_to_pairs({"prompt": "Hi?", "system": "Be brief.", "chosen": "Hello.", "rejected": "Go."}, "f:1")
    assert pair.prompt_messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert (pair.chosen, pair.rejected) == ("Hello.", "Go.")


def test_messages_prompt_keeps_the_conversation():
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
              {"role": "user", "content": "How are you?"}]
    (pair,) = row_to_pairs({"prompt": prompt, "chosen": "Fine.", "rejected": "Bad."}, "f:1")
    assert pair.prompt_messages == prompt


def test_k_wise_ranking_expands_into_all_ordered_pairs_best_first():
    row = {"prompt": "Q", "responses": ["a", "b", "c", "d"], "ranking": [2, 0, 3, 1]}
    pairs = row_to_pairs(row, "f:1")
    assert len(pairs) == 4 * 3 // 2
    assert [(p.chosen, p.rejected) for p in pairs] == [("c", "a"), ("c", "d"), ("c", "b"), ("a", "d"),
                                                       ("a", "b"), ("d", "b")]


BAD_ROWS = [
    ({"prompt": "Q", "chosen": " same ", "rejected": "same"}, r"'chosen' and 'rejected' are the same text"),
    ({"prompt": "Q", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}, (r"'ranking' is \[0, 0, 1\], expected a "
                                                                           r"permutation of 0..2")),
    ({"prompt": "Q", "responses": ["a", "b"], "ranking": [0]}, r"expected a permutation of 0..1"),
    ({"prompt": "Q", "responses": ["a", "b"], "ranking": [0, 2]}, r"expected a permutation of 0..1"),
    ({"prompt": "Q", "responses": ["a", "b"], "ranking": [True, False]}, r"expected a permutation"),
    ({"prompt": "Q", "responses": ["a", "a "], "ranking": [0, 1]}, r"responses\[0\] and responses\[1\] are the same"),
    ({"prompt": "Q", "responses": ["a"], "ranking": [0]}, r"'responses' is 1 entries, expected a list of at least 2"),
    ({"prompt": "Q", "chosen": "a"}, r"missing field 'rejected'; fields present: 'prompt', 'chosen'"),
    ({"chosen": "a", "rejected": "b"}, r"missing field 'prompt'"),
    ({"prompt": "Q", "responses": ["a", "b"]}, r"missing field 'ranking'"),
    ({"prompt": "Q", "response": "a"}, r"neither 'chosen'/'rejected' nor 'responses'/'ranking'"),
    ({"prompt": "Q", "chosen": "a", "rejected": "   "}, r"field 'rejected' is empty"),
    ({"prompt": "Q", "responses": ["a", 3], "ranking": [0, 1]}, r"field responses\[1\] is a number, expected a string"),
    ({"prompt": 7, "chosen": "a", "rejected": "b"}, r"field 'prompt' is a number"),
    ({"prompt": [{"role": "bot", "content": "Q"}], "chosen": "a", "rejected": "b"}, r"prompt\[0\] has role 'bot'"),
    ({"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "chosen": "a",
      "rejected": "b"}, r"field 'prompt' ends with assistant; expected its last message to be a user turn"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_bad_rows_name_file_and_line(tmp_path, write_jsonl, row, message):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, "", row])
    with pytest.raises(DataError, match=rf"{path}:3: .*{message}"):
        list(iter_preference_rows(_cfg(path, tmp_path)))


def test_parquet_and_dataset_rows(tmp_path):
    rows = [{"prompt": "Q1", "responses": ["a", "b", "c"], "ranking": [2, 1, 0]},
            {"prompt": "Q2", "responses": ["x", "y"], "ranking": [1, 1]}]
    parquet = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    found = iter_preference_rows(_cfg(parquet, tmp_path))
    where, pairs = next(found)
    assert where == f"{parquet}: row 1" and [(p.chosen, p.rejected) for p in pairs] == [("c", "b"), ("c", "a"),
                                                                                       ("b", "a")]
    with pytest.raises(DataError, match=rf"{parquet}: row 2: field 'ranking' is \[1, 1\]"):
        next(found)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows[:1]).save_to_disk(str(saved))
    cfg = DataConfig(dataset=str(saved), cache_dir=str(tmp_path / "cache"))
    ((where, pairs),) = list(iter_preference_rows(cfg))
    assert where.endswith("row 1") and len(pairs) == 3


# -- tokens and collation --------------------------------------------------------------------------


def test_response_tokens_are_what_the_template_appends_including_end_of_turn(tokenizer):
    template = ChatMLTemplate(tokenizer)
    messages = [{"role": "user", "content": "How are you?"}]
    prompt = template.generation_prompt(messages)
    response = response_ids(template, messages, prompt, "Fine, thanks!")
    assert tokenizer.decode(response) == "Fine, thanks!<|im_end|>"
    full, _ = template.encode(messages + [{"role": "assistant", "content": "Fine, thanks!"}])
    assert full[:len(prompt) + len(response)] == prompt + response


def test_collate_pairs_hand_built():
    pairs = [([1, 2, 3], [4, 5], [6]), (np.array([7]), np.array([8, 9, 10]), np.array([11, 12]))]
    batch = collate_pairs(pairs, pad_id=0)
    x = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 0], [1, 2, 3, 6, 0], [7, 11, 12, 0, 0]]
    assert batch["labels"].tolist() == [[x, x, 4, 5, x], [8, 9, 10, x, x], [x, x, 6, x, x], [11, 12, x, x, x]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert batch["last_index"].tolist() == [4, 3, 3, 2]
    assert all(t.dtype == torch.long for t in batch.values())
    with pytest.raises(ValueError, match="empty response"):
        collate_pairs([([1], [], [2])], pad_id=0)


# -- overflow --------------------------------------------------------------------------------------


def test_fit_pair_policy():
    prompt, chosen, rejected = list(range(10)), [100, 101, 102, 103], [200, 201]
    assert fit_pair(prompt, chosen, rejected, 16, "truncate") == (prompt, chosen, rejected)
    # Longest response 4 <= seq_len/2: the prompt keeps its last 8 - 4 tokens, responses are whole.
    assert fit_pair(prompt, chosen, rejected, 8, "truncate") == ([6, 7, 8, 9], chosen, rejected)
    # Longest response 7 > seq_len/2: the prompt keeps its last 4, responses their first 4.
    long = list(range(100, 107))
    assert fit_pair(prompt, long, rejected, 8, "truncate") == ([6, 7, 8, 9], long[:4], rejected)
    assert fit_pair(prompt, chosen, rejected, 8, "drop") is None
    # Identical after truncation: no preference left.
    assert fit_pair(prompt, [1, 2, 3, 4, 5], [1, 2, 3, 4, 9], 8, "truncate") is None


@pytest.mark.parametrize("overflow", ["truncate", "drop"])
def test_overflow_counts_and_lengths(tmp_path, write_jsonl, tokenizer, overflow):
    long_answer = "The quick brown fox jumps over the lazy dog. " * 6
    rows = [{"prompt": f"Q{i}?", "chosen": "Fine." if i % 2 else long_answer, "rejected": "No."} for i in range(20)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    cache = prepare_preference_data(_cfg(path, tmp_path, seq_len=48, sft_overflow=overflow), tmp_path / "c",
                                    tokenizer)
    data = load_preference_data(cache)
    counts = data.manifest["counts"]
    assert counts["rows"] == counts["pairs"] == counts["prompts"] == 20
    assert counts[{"truncate": "truncated", "drop": "dropped"}[overflow]] == 10
    assert counts["kept"] == len(data.train) + len(data.val) == (20 if overflow == "truncate" else 10)
    im_end = tokenizer.token_to_id("<|im_end|>")
    for split in (data.train, data.val):
        for i in range(len(split)):
            prompt, chosen, rejected = split.pair(i)
            assert len(prompt) + max(len(chosen), len(rejected)) <= 48
            assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")  # the prompt's end is kept
            assert rejected[-1] == im_end  # the short answer keeps its end-of-turn
            if len(chosen) < 20:
                assert chosen[-1] == im_end
            else:  # the long answer keeps its start
                assert tokenizer.decode(chosen).startswith("The quick brown fox")


# -- cache and split -------------------------------------------------------------------------------


def test_cache_is_reused_and_a_half_written_one_rebuilt(tmp_path, write_jsonl, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", _rows(10))
    cfg = _cfg(path, tmp_path)
    first = prepare_preference_data(cfg, tmp_path / "c", tokenizer)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert prepare_preference_data(cfg, tmp_path / "c", tokenizer) == first
    assert (first / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    # A crash mid-write: a truncated token file makes the directory invalid, so it is rebuilt.
    tokens = first / "train_tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:5])
    with pytest.raises(DataError, match="not a complete preference cache"):
        load_preference_data(first)
    assert prepare_preference_data(cfg, tmp_path / "c", tokenizer) == first
    data = load_preference_data(first)
    assert data.manifest["counts"]["pairs"] == 10 + 10 * 3 and len(data.train) + len(data.val) == 40
    # Another seq_len is another cache.
    assert prepare_preference_data(_cfg(path, tmp_path, seq_len=40), tmp_path / "c", tokenizer) != first


def test_split_is_by_prompt_and_prompt_sets_split_alike(tmp_path, write_jsonl, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", _rows(20))
    cfg = _cfg(path, tmp_path, seq_len=128)  # prompts() keep seq_len // 2 tokens: all of these prompts
    data = load_preference_data(prepare_preference_data(cfg, tmp_path / "c", tokenizer))

    def prompts_of_pairs(split):
        return {tokenizer.decode(split.pair(i)[0]) for i in range(len(split))}

    train, val = prompts_of_pairs(data.train), prompts_of_pairs(data.val)
    assert train and val and not train & val
    assert len(data.val.prompts()) == 4 and len(data.train.prompts()) == 16
    assert {tokenizer.decode(p) for p in data.val.prompts()} == val
    assert len(data.val) == 4 * 4  # each val prompt: 1 pair row + 3 pairs of its ranking
    prompt_set = load_prompts(cfg, tokenizer)
    assert sorted(prompt_set.val_texts) == sorted(data.val.prompt_texts())
    assert {tokenizer.decode(p) for p in prompt_set.val} == val
    assert len(prompt_set.train) == len(prompt_set.train_texts) == 16


def test_prompts_from_sft_chat_data(tmp_path, write_jsonl, tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello."},
                          {"role": "user", "content": f"Bye {i}?"}, {"role": "assistant", "content": "Bye."}]}
            for i in range(5)] + [{"prompt": "Solo?", "response": "Yes."}, {"prompt": "Only a prompt"}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    prompt_set = load_prompts(_cfg(path, tmp_path, seq_len=256), tokenizer)
    texts = sorted(prompt_set.train_texts + prompt_set.val_texts)
    assert texts == sorted([f"Bye {i}?" for i in range(5)] + ["Solo?", "Only a prompt"])
    first = (prompt_set.train + prompt_set.val)[
        (prompt_set.train_texts + prompt_set.val_texts).index("Bye 0?")]
    assert tokenizer.decode(first) == ("<|im_start|>user\nHi 0<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
                                       "<|im_start|>user\nBye 0?<|im_end|>\n<|im_start|>assistant\n")
    short = load_prompts(_cfg(path, tmp_path, seq_len=256), tokenizer, max_len=5)
    assert all(len(p) <= 5 for p in short.train + short.val)


def test_prompt_metadata_is_the_rows_other_fields(tmp_path, write_jsonl, tokenizer):
    rows = [{"prompt": "Sum?", "response": "3", "system": "Be brief.", "answer": 3, "tags": ["easy"]},
            {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
            {"prompt": "Only a prompt", "answer": "x"},
            {"prompt": "Pick?", "chosen": "Good.", "rejected": "Bad.", "annotator": "human"},
            {"prompt": "Sum?", "system": "Be brief.", "response": "three", "answer": 4}]  # the first row's counts
    prompt_set = load_prompts(_cfg(write_jsonl(tmp_path / "m.jsonl", rows), tmp_path, seq_len=256), tokenizer)
    meta = dict(zip(prompt_set.train_texts + prompt_set.val_texts, prompt_set.train_meta + prompt_set.val_meta))
    assert meta == {"Sum?": {"answer": 3, "tags": ["easy"]}, "Hi?": {}, "Only a prompt": {"answer": "x"},
                    "Pick?": {"chosen": "Good.", "rejected": "Bad.", "annotator": "human"}}
    assert len(prompt_set.val_meta) == len(prompt_set.val) and len(prompt_set.train_meta) == len(prompt_set.train)


def test_a_declared_split_is_honoured_by_the_cache_and_the_prompt_set(tmp_path, write_jsonl, tokenizer):
    rows = [{**row, "split": "val" if "Question 3:" in row["prompt"] or "Question 7:" in row["prompt"] else "train"}
            for row in _rows(10)]
    cfg = _cfg(write_jsonl(tmp_path / "p.jsonl", rows), tmp_path, seq_len=128)
    data = load_preference_data(prepare_preference_data(cfg, tmp_path / "c", tokenizer))
    expected = {"Question 3: how are you?", "Question 7: how are you?"}
    assert set(data.val.prompt_texts()) == expected and len(data.train.prompt_texts()) == 8
    prompt_set = load_prompts(cfg, tokenizer)
    assert set(prompt_set.val_texts) == expected and len(prompt_set.train_texts) == 8
    assert prompt_set.val_meta == [{"chosen": "Fine 3.", "rejected": "Go away"},  # each prompt's first row, no split
                                   {"chosen": "Fine 7.", "rejected": "Go away"}]


def test_one_prompt_in_two_declared_splits_fails(tmp_path, write_jsonl, tokenizer):
    rows = [{"prompt": "Q?", "chosen": "Yes.", "rejected": "No.", "split": "train"},
            {"prompt": "R?", "chosen": "Yes.", "rejected": "No.", "split": "val"},
            {"prompt": "Q?", "chosen": "Sure.", "rejected": "No.", "split": "val"}]
    cfg = _cfg(write_jsonl(tmp_path / "p.jsonl", rows), tmp_path)
    message = r"p.jsonl:3: split 'val', but the same prompt has split 'train' at .*p.jsonl:1"
    with pytest.raises(DataError, match=message):
        prepare_preference_data(cfg, tmp_path / "c", tokenizer)
    with pytest.raises(DataError, match=message):
        load_prompts(cfg, tokenizer)


# -- the embedded default --------------------------------------------------------------------------


def test_rule_ranked_rows_are_consistent_with_the_annotator():
    questions = [(f"f.yml:{i}", f"What is your favourite colour number {i}?", f"Blue, number {i}.")
                 for i in range(6)]
    rows = preference_module.rule_ranked_rows(questions, seed=3)
    assert rows == preference_module.rule_ranked_rows(questions, seed=3)  # deterministic
    annotator = RuleAnnotator()
    assert [row["source"] for row in rows] == [source for source, _, _ in questions]
    for row, (_, _, answer) in zip(rows, questions):
        scores = [annotator.score(row["prompt"], r) for r in row["responses"]]
        assert row["responses"][0] == answer  # the real answer comes first
        assert row["ranking"] == annotator.rank(row["prompt"], row["responses"])
        assert min(abs(a - b) for i, a in enumerate(scores) for b in scores[i + 1:]) >= 0.2 - 1e-9
        row_to_pairs(row, row["source"])  # a valid K-wise row


@pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None,
                    reason="chatterbot-corpus is not installed (pip install --no-deps chatterbot-corpus)")
def test_embedded_prefs_default_builds_once_and_ranks_like_the_annotator(tmp_path, tokenizer, monkeypatch):
    path = embedded_corpus_path("prefs")
    assert path.is_file() and str(path).startswith(str(tmp_path / "llmsys_home" / "data" / "prefs"))
    stamp = path.stat().st_mtime_ns
    assert embedded_corpus_path("prefs") == path and path.stat().st_mtime_ns == stamp
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) > 500
    annotator = RuleAnnotator()
    for row in rows:
        assert row["annotator"] == "rule-v1" and len(row["responses"]) >= 2
        assert row["ranking"] == annotator.rank(row["prompt"], row["responses"])
        # The polite variant of a short, not yet polite real answer is preferred to it.
        real = row["responses"][0]
        polite = [i for i, r in enumerate(row["responses"]) if r.endswith(real) and r.startswith(("Thanks", "Glad"))]
        if polite and len(words(real)) <= 9 and not annotator.breakdown(row["prompt"], real)["polite"]:
            assert row["ranking"].index(polite[0]) < row["ranking"].index(0)
    data = load_preference_data(prepare_preference_data(_cfg(path, tmp_path, seq_len=128, val_fraction=0.1),
                                                        tmp_path / "c", tokenizer))
    assert len(data.val.prompts()) == round(len(rows) * 0.1) and len(data.val) > 100
    # A new generator version writes a new file.
    monkeypatch.setattr(preference_module, "PREFS_GENERATOR_VERSION", preference_module.PREFS_GENERATOR_VERSION + 1)
    assert embedded_corpus_path("prefs") != path
