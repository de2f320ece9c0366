"""Prompt sets for the online stages (PPO, GRPO): the distinct prompts of preference or SFT chat data, as
generation prompts, with each prompt row's other fields.

A preference row (or a row with only ``"prompt"``) gives its prompt; an SFT row (prompt/response or
messages, or a chatterbot YAML conversation) gives its messages up to its last user turn. Prompts
are split train/val as :mod:`llmsys.data.preference` splits its pairs (the same seeded permutation of
the prompts in order of first appearance, or the split the rows declare in their ``"split"`` field),
so a preference file and the prompt set read from it split alike.

**Metadata.** Each prompt also keeps the fields of its (first) row that are not part of the prompt or
the conversation (:data:`CONVERSATION_FIELDS`: ``prompt``, ``response``, ``messages``, ``system``, and
``split``), as a dict: the ``answer`` of a verifiable task, an ``op`` label, a preference row's
``chosen``/``responses``/``annotator``. The reward functions receive it
(:mod:`llmsys.rlhf.rewards`). A chatterbot conversation has none (``{}``).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from llmsys.config.schema import DataConfig
from llmsys.data.chatterbot import CHATTERBOT_EXTENSIONS
from llmsys.data.conversations import Messages, iter_source_rows, row_to_messages
from llmsys.data.preference import (
    EXPECTED_ROW,
    NEEDS_TOKENIZER,
    PREFERENCE_EXTENSIONS,
    PromptSplits,
    keep_last,
    prompt_key,
    prompt_messages,
    prompt_text,
)
from llmsys.data.sources import DataError
from llmsys.data.templates import chat_template_for
from llmsys.data.tokenizer import Tokenizer, resolve_tokenizer

PROMPT_EXTENSIONS = PREFERENCE_EXTENSIONS + CHATTERBOT_EXTENSIONS
CONVERSATION_FIELDS = frozenset({"prompt", "response", "messages", "system", "split"})


def row_metadata(row: Any) -> dict[str, Any]:
    """The fields of a prompt row that are not its prompt or conversation (:data:`CONVERSATION_FIELDS`)."""
    return {key: value for key, value in row.items() if key not in CONVERSATION_FIELDS} if isinstance(row, dict) else {}


def _prompt_rows(cfg: DataConfig) -> Iterator[tuple[str, Messages, Any]]:
    """``(where, prompt messages, row as read)`` of every row (see :func:`iter_prompts`)."""
    for where, raw in iter_source_rows(cfg, PROMPT_EXTENSIONS, f"{EXPECTED_ROW} or SFT 'messages'/'prompt'"):
        row = {"messages": raw} if isinstance(raw, list) else raw  # a chatterbot conversation: a messages row
        if isinstance(row, dict) and ("chosen" in row or "responses" in row
                                      or ("prompt" in row and row.get("response") is None)):
            yield where, prompt_messages(row, where), raw
            continue
        messages = row_to_messages(row, where)
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise DataError(f"{where}: conversation has no user turn, so there is no prompt")
        yield where, messages[:last_user + 1], raw


def iter_prompts(cfg: DataConfig) -> Iterator[tuple[str, Messages]]:
    """``(where, prompt messages)`` of every row, from preference data or SFT chat data.

    A preference row (or a row with only ``"prompt"``) gives its prompt; an SFT row (prompt/response
    or messages, or a chatterbot YAML conversation) gives its messages up to its last user turn.
    """
    for where, messages, _ in _prompt_rows(cfg):
        yield where, messages


@dataclass
class PromptSet:
    """Generation prompts (token ids), their last user message (text, for the rewards and the annotator),
    their row's other fields (:func:`row_metadata`, for the rewards) and their messages (for a reader that
    renders them with another tokenizer: the pipeline's side-by-side) per split; the lists of a split align."""

    train: list[list[int]]
    val: list[list[int]]
    train_texts: list[str]
    val_texts: list[str]
    train_meta: list[dict[str, Any]] = field(default_factory=list)
    val_meta: list[dict[str, Any]] = field(default_factory=list)
    train_messages: list[Messages] = field(default_factory=list)
    val_messages: list[Messages] = field(default_factory=list)


def load_prompts(cfg: DataConfig, tokenizer: Tokenizer | None = None, max_len: int | None = None) -> PromptSet:
    """The distinct prompts of ``cfg`` (preference or SFT data, see :func:`iter_prompts`), split as the
    preference cache splits them; each is the template's generation prompt, keeping its LAST
    ``max_len`` tokens (default ``data.seq_len // 2``, so that a generation of as many tokens fits), with
    the metadata of its first row (:func:`row_metadata`)."""
    tokenizer = resolve_tokenizer(cfg, tokenizer, NEEDS_TOKENIZER)
    template = chat_template_for(tokenizer, cfg.chat_template)
    max_len = max_len or cfg.seq_len // 2
    prompts: dict[str, tuple[Messages, dict[str, Any]]] = {}
    splits = PromptSplits()
    for where, messages, row in _prompt_rows(cfg):
        key = prompt_key(messages)
        if key not in prompts:
            prompts[key] = (messages, row_metadata(row))
        splits.add(key, row, where)
    val = splits.val(cfg.val_fraction, str(cfg.path or cfg.dataset))
    result = PromptSet([], [], [], [], [], [], [], [])
    for index, (messages, meta) in enumerate(prompts.values()):
        split = "val" if index in val else "train"
        getattr(result, split).append(keep_last(template.generation_prompt(messages), max_len))
        getattr(result, f"{split}_texts").append(prompt_text(messages))
        getattr(result, f"{split}_meta").append(meta)
        getattr(result, f"{split}_messages").append(messages)
    return result
