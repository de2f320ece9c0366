"""llmsys.chat driven as a user drives it (through a pipe and through a terminal): every turn's answer must be
what ``generate`` gives for the same history, streamed whole-character by whole-character."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmsys.chat import Chat, TextStream
from llmsys.data import DataError, chat_template_for
from llmsys.eval.probes import load_export
from llmsys.generate import Sampling, load_chat_model
from tests.tiny_chat import chat_tokenizer, greedy_answer, tiny_chat_export, tiny_model

SYSTEM = "You are terse."
FIRST = "Hello there"
MAX_NEW = 12
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    # Room for the whole conversation below: no turn is dropped to fit.
    return tiny_chat_export(tmp_path_factory.mktemp("chat"), [{"role": "system", "content": SYSTEM},
                                                              {"role": "user", "content": FIRST}], stop_step=4,
                            max_seq_len=256)


def _chat_command(export: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "llmsys.chat", str(export), "--temperature", "0", "--max-new-tokens", str(MAX_NEW),
            *flags]


def test_piped_turns_are_generate_answers_for_the_history(export):
    lines = [FIRST, "日本語 café?", "", "and then?", "/reset", FIRST]
    proc = subprocess.run(_chat_command(export, "--system", SYSTEM), input="\n".join(lines) + "\n",
                          check=False, capture_output=True, text=True, encoding="utf-8", env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr

    # The same conversation by hand: the history (system first) through the chat template, greedy generate.
    model, tokenizer = load_export(export)
    history = [{"role": "system", "content": SYSTEM}]
    expected, finished = [], []
    for line in lines:
        if line == "/reset":
            history = history[:1]
            continue
        if not line:
            continue
        messages = history + [{"role": "user", "content": line}]
        answer, _, done = greedy_answer(model, tokenizer, messages, MAX_NEW)
        history = messages + [{"role": "assistant", "content": answer}]
        expected.append(answer)
        finished.append(done)
    # Both kinds of turn happen: one that ends at the end-of-turn token, one that runs to the limit.
    assert finished[0] and not all(finished), finished
    assert "\ufffd" in expected[1]  # the random model emits stray bytes: decoding must still match exactly
    assert proc.stdout == "".join(answer + "\n" for answer in expected)
    assert expected[-1] == expected[0]  # after /reset the history is the system message again
    assert "history cleared" in proc.stderr and "dropped" not in proc.stderr


def test_terminal_session_prompts_and_ctrl_d_exits_cleanly(export):
    pid, fd = pty.fork()
    if pid == 0:  # the child: the chat on the terminal's slave side
        os.execve(sys.executable, _chat_command(export, "--system", SYSTEM), ENV)
    seen = b""

    def read_until(marker: bytes, timeout: float = 60.0) -> bool:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    seen += os.read(fd, 4096)
                except OSError:  # the child closed the terminal
                    break
        return marker in seen

    try:
        assert read_until(b"> "), seen
        model, tokenizer = load_export(export)
        answer, _, _ = greedy_answer(model, tokenizer, [{"role": "system", "content": SYSTEM},
                                                       {"role": "user", "content": FIRST}], MAX_NEW)
        os.write(fd, FIRST.encode() + b"\n")
        assert read_until(answer.encode() + b"\r\n> ", 30), seen
        os.write(fd, b"\x04")  # Ctrl-D at an empty prompt: end of input
        _, status = os.waitpid(pid, 0)
        pid = 0
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, seen
    assert b"Traceback" not in seen


def test_text_stream_writes_only_whole_characters(tmp_path):
    tokenizer = chat_tokenizer(tmp_path / "tok")
    text = "Hello 日本語 café 🙂!"
    ids = tokenizer.encode(text)
    assert len(tokenizer.encode("日")) == 3  # the ASCII-trained BPE splits it into its three UTF-8 bytes
    chunks: list[str] = []
    stream = TextStream(tokenizer, chunks.append)
    for token in ids:
        stream.push(token)
    stream.close(tokenizer.decode(ids))
    assert "".join(chunks) == text
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert len(chunks) < len(ids)  # partial characters were held back, not written as U+FFFD


def test_history_is_trimmed_to_the_context_and_an_oversized_message_refused(tmp_path):
    tokenizer = chat_tokenizer(tmp_path / "tok")
    model = tiny_model(tokenizer.vocab_size, max_seq_len=96)
    template = chat_template_for(tokenizer, "auto")
    notices: list[str] = []
    chat = Chat(model, tokenizer, template, Sampling(temperature=0.0, max_new_tokens=8), system="Be brief.",
                notice=notices.append)
    question = "How are you?"  # 44 tokens with the system message and the headers: a third exchange overflows
    for _ in range(4):
        answer = chat.reply(question, lambda text: None)
        assert answer is not None
    assert any("dropped the oldest turns" in n for n in notices), notices
    prompt = template.generation_prompt(chat.system + chat.turns[:-1])
    assert len(prompt) + 8 <= 96 and chat.turns[0]["role"] == "user" and len(chat.turns) < 8
    # What was kept is answered as generate answers that history.
    assert chat.turns[-1]["content"] == greedy_answer(model, tokenizer, chat.system + chat.turns[:-1], 8)[0]
    turns = list(chat.turns)
    assert chat.reply("word " * 80, lambda text: None) is None
    assert "message not answered" in notices[-1] and chat.turns == turns  # the history is kept


def test_reward_models_and_missing_directories_are_refused(tmp_path):
    with pytest.raises(DataError, match="no config.json"):
        load_chat_model(tmp_path / "nothing", "cpu")
    reward = tmp_path / "reward"
    reward.mkdir()
    (reward / "config.json").write_text('{"format": "llmsys", "head": "scalar", "model": {}}')
    with pytest.raises(DataError, match="reward model or critic"):
        load_chat_model(reward, "cpu")
    proc = subprocess.run([sys.executable, "-m", "llmsys.chat", str(reward)], input="", check=False,
                          capture_output=True, text=True, env=ENV, timeout=60)
    assert proc.returncode == 1 and "llmsys.chat: " in proc.stderr and "Traceback" not in proc.stderr
