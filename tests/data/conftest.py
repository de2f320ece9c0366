"""Fixtures for the data tests: isolated caches, small, varied corpora written on the fly, a small tokenizer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import datasets
import pytest

from llmsys.data import Tokenizer, train_bpe_tokenizer

from .corpora import CHAT_TOKENIZER_TEXT


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing a test does may write under the real home directory."""
    monkeypatch.setenv("LLMSYS_HOME", str(tmp_path / "llmsys_home"))
    # `datasets` reads HF_HOME at import time; patch the resolved locations instead.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


WriteTexts = Callable[[Path, Sequence[str]], Path]


@pytest.fixture
def write_text_corpus() -> WriteTexts:
    """Write each document as its own .txt file (doc_000.txt, ...) under a folder; return the folder."""

    def write(folder: Path, documents: Sequence[str]) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for index, text in enumerate(documents):
            (folder / f"doc_{index:03d}.txt").write_text(text, encoding="utf-8")
        return folder

    return write


@pytest.fixture
def write_jsonl() -> Callable[[Path, Sequence[object]], Path]:
    """Write rows as JSON Lines (strings are written verbatim as raw lines)."""

    def write(path: Path, rows: Sequence[object]) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A small byte-level BPE tokenizer (300 tokens, chat special tokens included), one per test module."""
    return train_bpe_tokenizer(CHAT_TOKENIZER_TEXT, 300)
