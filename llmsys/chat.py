"""``python -m llmsys.chat DIR``: talk to a model, turn by turn, with its answers streamed as they are made.

``DIR`` is any stage's export (``<output_dir>/final``) or a Hugging Face Llama-family directory
(converted in memory by :mod:`llmsys.models.hf`). The conversation so far is rendered with the model's
own chat template (``llmsys.data.templates.chat_template_for(tokenizer, "auto")``, as SFT trained it),
so each answer is exactly what ``llmsys.models.generation.generate`` gives for that history; it stops
at the template's end-of-turn token or ``--max-new-tokens``. Sampling: ``--temperature`` (0 is greedy),
``--top-p``, and ``--seed``, which seeds one generator at the start.

**Input.** Each line of stdin is one user turn; blank lines are skipped. ``/reset`` clears the history
(a ``--system`` message stays). End of input (Ctrl-D) exits with status 0. Ctrl-C while an answer is
being written stops it (the turn is dropped); at the prompt it exits.

**Output.** On a terminal the user is prompted with ``> ``. Otherwise stdout carries nothing but the
answers, each followed by one newline (an empty one for a message too long to answer), so a program can
drive a conversation; notices (a cleared history, turns dropped to fit the model's context) go to stderr.
Tokens are decoded incrementally: text is written as soon as it is whole, so a character split across
byte-level tokens comes out once, complete.

**Context.** The history is rendered whole each turn. When it leaves fewer than
``min(--max-new-tokens, max_seq_len // 2)`` positions to answer in, the oldest turns are dropped (the
system message stays); a message that does not fit even alone is refused.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterator, Optional, Sequence, TextIO

import torch

from llmsys.data import DataError, Tokenizer
from llmsys.data.conversations import Messages
from llmsys.generate import Sampling, Template, add_model_arguments, answer_text, load_chat_model, sampling_from
from llmsys.models import Transformer
from llmsys.models.generation import generate

RESET = "/reset"
PROMPT = "> "


class TextStream:
    """Incremental decoding: feed token ids one at a time, get the new text once it is complete.

    The ids so far are decoded whole each time (a byte-level token may hold part of a character, and
    some tokenizers' decoding of a token depends on its neighbours); text ending in U+FFFD, an incomplete
    UTF-8 sequence, is held back until the next token completes it."""

    def __init__(self, tokenizer: Tokenizer, write: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.write = write
        self.ids: list[int] = []
        self.written = 0  # characters of the decoded text already written

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def close(self, text: str) -> None:
        """Write what is left of ``text``, the answer's final decoding (a held-back tail included)."""
        self._emit(text)

    def _emit(self, text: str) -> None:
        if len(text) > self.written:
            self.write(text[self.written:])
            self.written = len(text)


class Chat:
    """A conversation with one model: the history, and the next answer to a user message."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, template: Template, sampling: Sampling,
                 system: Optional[str] = None, notice: Callable[[str], None] = lambda message: None) -> None:
        self.model, self.tokenizer, self.template, self.sampling = model, tokenizer, template, sampling
        self.system = [{"role": "system", "content": system}] if system else []
        self.notice = notice
        self.turns: Messages = []  # user and assistant messages, oldest first
        device = model.tok_embeddings.weight.device
        self.generator = torch.Generator(device=device).manual_seed(sampling.seed)

    def reset(self) -> None:
        self.turns = []

    def _prompt(self, user: str) -> Optional[list[int]]:
        """The generation prompt for ``user`` after the history, oldest turns dropped until the answer has room;
        None (the history untouched) when ``user`` does not fit even alone."""
        limit = self.model.cfg.max_seq_len
        wanted = min(self.sampling.max_new_tokens, limit // 2)
        message = [{"role": "user", "content": user}]
        alone = self.template.generation_prompt(self.system + message)
        if len(alone) >= limit:
            self.notice(f"message not answered: the prompt is {len(alone)} tokens, the model holds {limit}")
            return None
        ids = self.template.generation_prompt(self.system + self.turns + message)
        if limit - len(ids) < wanted and self.turns:
            while limit - len(ids) < wanted and self.turns:
                # Drop the oldest exchange: everything before the second user turn.
                drop = next((i for i, turn in enumerate(self.turns) if i > 0 and turn["role"] == "user"),
                            len(self.turns))
                self.turns = self.turns[drop:]
                ids = self.template.generation_prompt(self.system + self.turns + message)
            self.notice(f"dropped the oldest turns to fit the model's context (max_seq_len={limit}); "
                        f"{len(self.turns)} messages kept")
        return ids

    def reply(self, user: str, write: Callable[[str], None]) -> Optional[str]:
        """Answer ``user`` after the history, writing the answer's text as it is made; the answer (also added to
        the history), or None when the message does not fit the model's context."""
        ids = self._prompt(user)
        if ids is None:
            return None
        stream = TextStream(self.tokenizer, write)
        end_of_turn = self.template.end_of_turn_id

        def on_tokens(tokens: torch.Tensor) -> None:
            token = int(tokens[0])
            if token != end_of_turn:
                stream.push(token)

        budget = min(self.sampling.max_new_tokens, self.model.cfg.max_seq_len - len(ids))
        out = generate(self.model, [ids], budget, temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                       eos_id=end_of_turn, pad_id=self.tokenizer.pad_id, generator=self.generator,
                       on_tokens=on_tokens)
        answer = answer_text(self.tokenizer, out.tokens[0, :int(out.lengths[0])].tolist(), bool(out.finished[0]))
        stream.close(answer)
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return answer


def _lines(stdin: TextIO, interactive: bool) -> Iterator[str]:
    """The user's lines until end of input; on a terminal through ``input`` (line editing, the prompt)."""
    if interactive:
        while True:
            try:
                yield input(PROMPT)
            except EOFError:
                print(file=sys.stdout)  # end the prompt's line
                return
    for line in stdin:
        yield line.rstrip("\r\n")


def run(chat: Chat, lines: Iterator[str], stdout: TextIO, notice: Callable[[str], None]) -> None:
    """Answer every line (the module docstring's protocol) until the lines end."""

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    for line in lines:
        if line.strip() == RESET:
            chat.reset()
            notice("history cleared")
            continue
        if not line.strip():
            continue
        try:
            chat.reply(line, write)
            write("\n")  # also after a message not answered: one block per turn keeps a reader in step
        except KeyboardInterrupt:
            write("\n")
            notice("answer interrupted; the turn is dropped")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmsys.chat", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="a system message that opens the conversation")
    args = parser.parse_args(argv)
    sampling = sampling_from(args, parser)
    for stream in (sys.stdin, sys.stdout):  # a byte the terminal's encoding lacks must not end the chat
        stream.reconfigure(errors="replace")

    def notice(message: str) -> None:
        print(f"[llmsys.chat] {message}", file=sys.stderr, flush=True)

    try:
        model, tokenizer, template = load_chat_model(args.model_dir, args.device)
    except (DataError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"llmsys.chat: {error}") from None
    interactive = sys.stdin.isatty() and sys.stdout.isatty()  # a prompt only where a person reads it
    if interactive:
        notice(f"{args.model_dir} (chat template {template.name}, end of turn "
               f"{tokenizer.id_to_token(template.end_of_turn_id)}); {RESET} clears the history, Ctrl-D exits")
    chat = Chat(model, tokenizer, template, sampling, system=args.system, notice=notice)
    try:
        run(chat, _lines(sys.stdin, interactive), sys.stdout, notice)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
