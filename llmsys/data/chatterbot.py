"""The chatterbot-corpus YAML format: conversations as lists of alternating user and assistant turns.

``chatterbot-corpus`` (BSD; ``pip install --no-deps chatterbot-corpus``) is the embedded SFT default
(``${llmsys.corpus:chatterbot}``): its English part is 21 YAML files holding 2026 short
conversations, most of them one question and one answer. Each conversation ``[turn_1, turn_2, ...]``
becomes alternating user and assistant messages; a trailing user turn with no answer is dropped.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import yaml

from llmsys.data.sources import DataError, _decode_utf8

logger = logging.getLogger(__name__)

CHATTERBOT_EXTENSIONS = (".yml", ".yaml")


def read_chatterbot_yaml(path: Path) -> Iterator[tuple[int, list[dict[str, str]]]]:
    """``(1-based line, messages)`` for each conversation of a chatterbot-corpus YAML file.

    The file is ``{categories: [...], conversations: [[turn, turn, ...], ...]}``; turns alternate
    user, assistant, user, ... An entry that is not a list of at least two text turns (the shipped
    ``trivia.yml`` has one, a mis-indented question) is skipped with a warning: the corpus is third-party
    data we cannot fix, and one bad entry should not make the default unusable.
    """
    text = _decode_utf8(path.read_bytes(), path, None)
    try:
        # compose keeps the line of every node; construct gives the plain values.
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise DataError(f"{path}: invalid YAML ({err}); expected a chatterbot-corpus file") from None
    conversations = None
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            if key.value == "conversations":
                conversations = value
    if not isinstance(conversations, yaml.SequenceNode):
        raise DataError(f"{path}: no 'conversations' list; expected a chatterbot-corpus file")
    for node in conversations.value:
        line_no = node.start_mark.line + 1
        turns = node.value if isinstance(node, yaml.SequenceNode) else None
        if not turns or not all(isinstance(turn, yaml.ScalarNode) for turn in turns) or len(turns) < 2:
            logger.warning("%s:%d: skipping a conversation that is not a list of at least two text turns",
                           path, line_no)
            continue
        # Take the scalars' source text: YAML 1.1 would turn an answer "yes" or "no" into a boolean.
        contents = [turn.value for turn in turns]
        if len(contents) % 2:
            contents = contents[:-1]
        roles = ("user", "assistant") * (len(contents) // 2)
        yield line_no, [{"role": role, "content": content} for role, content in zip(roles, contents)]
