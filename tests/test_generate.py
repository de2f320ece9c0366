"""llmsys.generate: batched answers to a prompts file must be the answers each prompt gets alone, rows in the
prompts' order with their settings; a bad prompts file fails naming file:line, and no run leaves a
half-written output."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmsys.data import DataError, chat_template_for
from llmsys.eval.probes import load_export
from llmsys.generate import main, read_prompts
from tests.tiny_chat import greedy_answer, tiny_chat_export

STOP_PROMPT = [{"role": "user", "content": "Hello there"}]
ROWS = [
    {"prompt": "Hello there"},
    {"prompt": "What is the capital of France?", "system": "Answer in one word."},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                  {"role": "user", "content": "Tell me a joke."}]},
    {"prompt": [{"role": "user", "content": "日本語?"}]},
    {"prompt": "The sun is a star."},
]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return tiny_chat_export(tmp_path_factory.mktemp("generate"), STOP_PROMPT, stop_step=4)


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _messages(row: dict) -> list[dict]:
    if "messages" in row:
        return row["messages"]
    if isinstance(row["prompt"], list):
        return row["prompt"]
    system = [{"role": "system", "content": row["system"]}] if "system" in row else []
    return system + [{"role": "user", "content": row["prompt"]}]


def test_batched_answers_equal_each_prompt_alone(tmp_path, export):
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    out = tmp_path / "out" / "answers.jsonl"
    main([str(export), "--prompts", str(prompts), "--out", str(out), "--batch-size", "2", "--temperature", "0",
          "--max-new-tokens", "10"])
    rows = _read_jsonl(out)
    assert len(rows) == len(ROWS)
    model, tokenizer = load_export(export)
    for given, row in zip(ROWS, rows):
        text, n, finished = greedy_answer(model, tokenizer, _messages(given), 10)
        assert row == {"prompt": given.get("prompt", given.get("messages")), "response": text,
                       "tokens": n, "finished": finished, "model": str(export),
                       "temperature": 0.0, "top_p": 0.9, "max_new_tokens": 10, "seed": 0}
    finished = [row["finished"] for row in rows]
    assert finished[0] and not all(finished), finished  # answers that end their turn and ones cut at the limit
    assert not list(out.parent.glob(".*.tmp"))


def test_text_prompts_and_seeded_sampling(tmp_path, export):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\n\n  What is the capital of France?  \nThe sun is a star.\n", encoding="utf-8")
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        main([str(export), "--prompts", str(prompts), "--out", str(tmp_path / f"{name}.jsonl"), "--temperature",
              "1.0", "--top-p", "0.95", "--seed", str(seed), "--max-new-tokens", "8"])
        runs[name] = _read_jsonl(tmp_path / f"{name}.jsonl")
    assert [row["prompt"] for row in runs["a"]] == ["Hello there", "What is the capital of France?",
                                                    "The sun is a star."]
    assert runs["a"] == runs["b"]  # the same seed, the same file
    assert [row["response"] for row in runs["a"]] != [row["response"] for row in runs["c"]]
    assert {(row["temperature"], row["top_p"], row["seed"]) for row in runs["c"]} == {(1.0, 0.95, 4)}


def test_prompts_near_the_context_limit_get_the_room_they_leave(tmp_path, export):
    model, tokenizer = load_export(export)
    long = {"prompt": "The sun is a star; the moon is not. " * 2}
    room = model.cfg.max_seq_len - len(chat_template_for(tokenizer).generation_prompt(_messages(long)))
    assert 0 < room < 40
    short = ROWS[4]
    assert greedy_answer(model, tokenizer, _messages(short), 40)[1:] == (40, False)  # it would use every token
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [short, long])
    main([str(export), "--prompts", str(prompts), "--out", str(tmp_path / "out.jsonl"), "--temperature", "0",
          "--max-new-tokens", "40"])
    rows = _read_jsonl(tmp_path / "out.jsonl")
    for given, row, budget in zip((short, long), rows, (40, room)):  # neither is cut short by the other
        assert (row["response"], row["tokens"], row["finished"]) == greedy_answer(model, tokenizer, _messages(given),
                                                                                  budget)
    assert (rows[0]["tokens"], rows[1]["tokens"], rows[1]["finished"]) == (40, room, False)

    too_long = _write_jsonl(tmp_path / "too_long.jsonl", [ROWS[0], {"prompt": "word " * 100}])
    with pytest.raises(SystemExit, match=r"too_long\.jsonl:2: the prompt is \d+ tokens, which leaves no room"):
        main([str(export), "--prompts", str(too_long), "--out", str(tmp_path / "x.jsonl")])


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "ok"', r"bad\.jsonl:2: invalid JSON"),
    ('["a list"]', r"bad\.jsonl:2: got a JSON array, expected a JSON object with \{\"prompt\""),
    ('{"text": "hi"}', r"bad\.jsonl:2: neither 'prompt' and 'messages' \(fields present: 'text'\); expected"),
    ('{"prompt": "a", "messages": []}', r"bad\.jsonl:2: both 'prompt' and 'messages'"),
    ('{"prompt": 3}', r"bad\.jsonl:2: field 'prompt' is a number, expected a string or a list"),
    ('{"messages": "hi"}', r"bad\.jsonl:2: field 'messages' is a string, expected a list"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     r"bad\.jsonl:2: field 'messages' ends with assistant; expected its last message to be a user turn"),
    ('{"messages": [{"role": "robot", "content": "a"}]}', r"bad\.jsonl:2: messages\[0\] has role 'robot'"),
])
def test_bad_prompt_rows_name_file_line_and_what_was_expected(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_prompts(path)


def test_bad_text_file_and_failed_run_keep_the_old_output(tmp_path, export):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"bad\.txt:2: not UTF-8"):
        read_prompts(bad)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match=r"empty\.txt: no prompts"):
        read_prompts(tmp_path / "empty.txt")
    out = tmp_path / "answers.jsonl"
    out.write_text("earlier results\n")
    proc = subprocess.run([sys.executable, "-m", "llmsys.generate", str(export), "--prompts", str(bad), "--out",
                           str(out)], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "llmsys.generate: " in proc.stderr and "bad.txt:2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert out.read_text() == "earlier results\n"
