"""Chat rows: reading the rows of ``data.path`` / ``data.dataset`` and checking them as conversations.

A row is, detected per row, either ``{"prompt", "response"[, "system"]}`` or ``{"messages": [{"role",
"content"}, ...]}`` with roles system/user/assistant (multi-turn); a chatterbot-corpus YAML file
(the embedded default) gives its conversations as message lists. Bad rows fail with
:class:`DataError` naming file and line. SFT reads conversations (:func:`iter_conversations`); the
preference and prompt readers check their own row forms with :func:`message_fields`,
:func:`check_message` and :func:`user_turn_messages` over the same :func:`iter_source_rows`.

**A row's own split.** A row may declare its split, ``"split": "train"`` or ``"val"`` (the embedded
``data=arith`` task does, so that SFT and the online stages hold out the same problems). Then every
row of the source must declare one (:class:`DeclaredSplits` fails on a mix, naming a row of each kind),
and the SFT, preference and prompt readers put each row in its declared split instead of drawing their
seeded split (``data.val_fraction`` is then unused). Data without the field splits as before.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from llmsys.config.schema import DataConfig
from llmsys.data.chatterbot import CHATTERBOT_EXTENSIONS, read_chatterbot_yaml
from llmsys.data.embedded import prepare_generated_corpus
from llmsys.data.sources import (
    DataError,
    json_type,
    list_files,
    load_hf_dataset,
    read_jsonl_rows,
    read_parquet_rows,
)

ROLES = ("system", "user", "assistant")
SFT_EXTENSIONS = (".jsonl", ".parquet") + CHATTERBOT_EXTENSIONS
SPLIT_FIELD = "split"
DECLARED_SPLITS = ("train", "val")  # the values of SPLIT_FIELD: the splits of llmsys.data.token_cache.SPLITS

Messages = list[dict[str, str]]


def message_fields(message: Any, where: str, label: str) -> tuple[Any, Any]:
    """``(role, content)`` of a chat message object, unchecked; a :class:`DataError` if it is not one."""
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise DataError(f"{where}: {label} is not an object with 'role' and 'content'")
    return message["role"], message["content"]


def check_message(where: str, label: str, role: Any, content: Any) -> None:
    """Fail with a :class:`DataError` (``"{where}: {label} ..."``) unless ``role`` is one of ROLES and ``content`` a string."""
    if role not in ROLES:
        raise DataError(f"{where}: {label} has role {role!r}; expected one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise DataError(f"{where}: {label} ({role}) content is a {json_type(content)}, expected a string")


def user_turn_messages(raw: Sequence[Any], where: str, field: str) -> Messages:
    """The chat messages of ``field`` (a list, already checked to be one), checked to end with the user turn
    to answer: a prompt given as a conversation."""
    messages = []
    for index, message in enumerate(raw):
        role, content = message_fields(message, where, f"{field}[{index}]")
        check_message(where, f"{field}[{index}]", role, content)
        messages.append({"role": role, "content": content})
    if not messages or messages[-1]["role"] != "user":
        last = messages[-1]["role"] if messages else "nothing"
        raise DataError(f"{where}: field {field!r} ends with {last}; expected its last message to be a user turn")
    return messages


def row_to_messages(row: Any, where: str) -> Messages:
    """Validate one row (prompt/response or messages form) and return it as chat messages."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: got a {json_type(row)}, expected an object with 'messages' or 'prompt'/'response'")
    if "messages" in row and row["messages"] is not None:
        raw = row["messages"]
        if not isinstance(raw, (list, tuple)):
            raise DataError(f"{where}: field 'messages' is a {json_type(raw)}, expected a list of "
                            f"{{'role', 'content'}} objects")
        messages = []
        for index, message in enumerate(raw):
            role, content = message_fields(message, where, f"messages[{index}]")
            messages.append({"role": role, "content": content})
    elif "prompt" in row and "response" in row:
        messages = []
        if row.get("system") is not None:
            messages.append({"role": "system", "content": row["system"]})
        messages += [{"role": "user", "content": row["prompt"]},
                     {"role": "assistant", "content": row["response"]}]
    else:
        present = ", ".join(repr(key) for key in row) or "none"
        raise DataError(f"{where}: neither 'messages' nor 'prompt' and 'response'; fields present: {present}; "
                        f"expected {{'messages': [...]}} or {{'prompt': ..., 'response': ...}}")
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        check_message(where, f"message {index}", role, content)
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: message {index} is an empty assistant response; expected text")
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: conversation has no assistant turn, so nothing to train on")
    return messages


def iter_source_rows(cfg: DataConfig, extensions: tuple[str, ...], expected: str) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` of every row of ``data.path`` (its ``extensions`` files) / ``data.dataset``, in a fixed order.

    JSON Lines, Parquet and `datasets` rows come as read (objects; ``expected`` says what a JSON Lines
    row should hold, for its error message). A chatterbot YAML conversation comes as its list of
    chat messages, already shaped by :func:`~llmsys.data.chatterbot.read_chatterbot_yaml`. A generated
    embedded corpus (``data=prefs``) is generated first if it is not yet.
    """
    if cfg.path is not None:
        prepare_generated_corpus(cfg.path)
        root = Path(cfg.path).expanduser()
        for file in list_files(root, extensions):
            suffix = file.suffix.lower()
            if suffix == ".jsonl":
                for line_no, row in read_jsonl_rows(file, expected):
                    yield f"{file}:{line_no}", row
            elif suffix == ".parquet":
                yield from read_parquet_rows(file)
            else:
                for line_no, messages in read_chatterbot_yaml(file):
                    yield f"{file}:{line_no}", messages
        return
    if cfg.dataset is None:
        raise DataError("data.path and data.dataset are both unset; expected exactly one of them")
    dataset = load_hf_dataset(cfg.dataset, cfg.dataset_config, cfg.split)
    for row_no, row in enumerate(dataset, start=1):
        yield f"dataset {cfg.dataset!r} (split {cfg.split!r}): row {row_no}", row


def row_split(row: Any, where: str) -> str | None:
    """The split that ``row`` declares in its ``"split"`` field (``"train"`` or ``"val"``), None without one."""
    if not isinstance(row, dict) or row.get(SPLIT_FIELD) is None:
        return None
    split = row[SPLIT_FIELD]
    if split not in DECLARED_SPLITS:
        raise DataError(f"{where}: field {SPLIT_FIELD!r} is {split!r}; expected one of "
                        f"{', '.join(map(repr, DECLARED_SPLITS))}")
    return split


class DeclaredSplits:
    """Reads the split each row of one source declares (:func:`row_split`): every row declares one, or none does."""

    def __init__(self) -> None:
        self._first_with: str | None = None
        self._first_without: str | None = None

    @property
    def declared(self) -> bool:
        """Whether the rows read so far declare their split."""
        return self._first_with is not None

    def read(self, row: Any, where: str) -> str | None:
        """The split of ``row`` (None when rows do not declare one); a :class:`DataError` on a mix."""
        split = row_split(row, where)
        if split is None:
            self._first_without = self._first_without or where
        else:
            self._first_with = self._first_with or where
        if self._first_with is not None and self._first_without is not None:
            raise DataError(f"{where}: {'no' if split is None else 'a'} {SPLIT_FIELD!r} field, but "
                            f"{self._first_with if split is None else self._first_without} has "
                            f"{'one' if split is None else 'none'}; either every row declares its split "
                            f"('train' or 'val') or none does")
        return split


def check_declared_split(val: int, total: int, source: str, what: str) -> None:
    """A :class:`DataError` unless the declared split leaves at least one ``what`` in each split."""
    if val == 0 or val == total:
        raise DataError(f"{source}: the rows' {SPLIT_FIELD!r} fields put {val} of {total} {what} in val; "
                        f"expected at least one in train and one in val")


def iter_split_conversations(cfg: DataConfig) -> Iterator[tuple[str, Messages, str | None]]:
    """``(where, messages, split)`` for every conversation, ``split`` the one its row declares (or None)."""
    splits = DeclaredSplits()
    for where, row in iter_source_rows(cfg, SFT_EXTENSIONS, "'messages' or 'prompt'/'response'"):
        # A chatterbot conversation is already a message list; every other row is validated.
        yield where, row if isinstance(row, list) else row_to_messages(row, where), splits.read(row, where)


def iter_conversations(cfg: DataConfig) -> Iterator[tuple[str, Messages]]:
    """``(where, messages)`` for every conversation of ``data.path`` / ``data.dataset``, in a fixed order."""
    for where, messages, _ in iter_split_conversations(cfg):
        yield where, messages
