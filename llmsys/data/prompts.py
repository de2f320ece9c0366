"""Prompt sets for PPO: the distinct prompts of preference or SFT chat data, as generation prompts.

A preference row (or a row with only ``"prompt"``) gives its prompt; an SFT row (prompt/response or
messages, or a chatterbot YAML conversation) gives its messages up to its last user turn. Prompts
are split train/val as :mod:`llmsys.data.preference` splits its pairs (the same seeded permutation of
the prompts in order of first appearance), so a preference file and the prompt set read from it
split alike.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from llmsys.config.schema import DataConfig
from llmsys.data.chatterbot import CHATTERBOT_EXTENSIONS
from llmsys.data.conversations import Messages, iter_source_rows, row_to_messages
from llmsys.data.preference import (
    EXPECTED_ROW,
    NEEDS_TOKENIZER,
    PREFERENCE_EXTENSIONS,
    keep_last,
    prompt_key,
    prompt_messages,
    prompt_text,
    val_prompts,
)
from llmsys.data.sources import DataError
from llmsys.data.templates import chat_template_for
from llmsys.data.tokenizer import Tokenizer, resolve_tokenizer

PROMPT_EXTENSIONS = PREFERENCE_EXTENSIONS + CHATTERBOT_EXTENSIONS


def iter_prompts(cfg: DataConfig) -> Iterator[tuple[str, Messages]]:
    """``(where, prompt messages)`` of every row, from preference data or SFT chat data.

    A preference row (or a row with only ``"prompt"``) gives its prompt; an SFT row (prompt/response
    or messages, or a chatterbot YAML conversation) gives its messages up to its last user turn.
    """
    for where, row in iter_source_rows(cfg, PROMPT_EXTENSIONS, f"{EXPECTED_ROW} or SFT 'messages'/'prompt'"):
        if isinstance(row, list):  # a chatterbot conversation: validated as a messages row
            row = {"messages": row}
        if isinstance(row, dict) and ("chosen" in row or "responses" in row
                                      or ("prompt" in row and row.get("response") is None)):
            yield where, prompt_messages(row, where)
            continue
        messages = row_to_messages(row, where)
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise DataError(f"{where}: conversation has no user turn, so there is no prompt")
        yield where, messages[:last_user + 1]


@dataclass
class PromptSet:
    """Generation prompts (token ids) and their last user message (text, for the annotator) per split."""

    train: list[list[int]]
    val: list[list[int]]
    train_texts: list[str]
    val_texts: list[str]


def load_prompts(cfg: DataConfig, tokenizer: Tokenizer | None = None, max_len: int | None = None) -> PromptSet:
    """The distinct prompts of ``cfg`` (preference or SFT data, see :func:`iter_prompts`), split as the
    preference cache splits them; each is the template's generation prompt, keeping its LAST
    ``max_len`` tokens (default ``data.seq_len // 2``, so that a generation of as many tokens fits)."""
    tokenizer = resolve_tokenizer(cfg, tokenizer, NEEDS_TOKENIZER)
    template = chat_template_for(tokenizer, cfg.chat_template)
    max_len = max_len or cfg.seq_len // 2
    prompts: dict[str, Messages] = {}
    for _, messages in iter_prompts(cfg):
        prompts.setdefault(prompt_key(messages), messages)
    val = val_prompts(len(prompts), cfg.val_fraction, str(cfg.path or cfg.dataset))
    result = PromptSet([], [], [], [])
    for index, messages in enumerate(prompts.values()):
        split = "val" if index in val else "train"
        getattr(result, split).append(keep_last(template.generation_prompt(messages), max_len))
        getattr(result, f"{split}_texts").append(prompt_text(messages))
    return result
