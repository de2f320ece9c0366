"""The tokenizer wrapper: byte-level BPE training, round trips, persistence and caching."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from llmsys.config import DataConfig
from llmsys.data import (
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    DataError,
    Tokenizer,
    get_tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)
from llmsys.data import tokenizer as tokenizer_module

from .corpora import make_documents

VOCAB = 320


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return train_bpe_tokenizer(make_documents(60, seed=1), vocab_size=VOCAB)


def test_special_tokens_and_sizes(trained: Tokenizer) -> None:
    assert [trained.token_to_id(token) for token in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert trained.eos_id == 0 and trained.bos_id == 0 and trained.pad_id == 1
    assert trained.vocab_size == VOCAB  # the corpus is rich enough to fill the vocabulary
    # Merges were learned: common words are single tokens, so text compresses below 1 token/byte.
    text = make_documents(5, seed=99)[0]
    assert len(trained.encode(text)) < 0.7 * len(text.encode("utf-8"))


@pytest.mark.parametrize(
    "text",
    ["", " leading and trailing  ", "línea\r\n\ttab 日本語 😀 \x00\x7f", "never seen: ʘ‿ʘ ∮ 𝔘𝔫𝔦", "a" * 1000],
)
def test_decode_inverts_encode(trained: Tokenizer, text: str) -> None:
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert trained.encode_batch([text, "x"]) == [ids, trained.encode("x")]


def test_special_token_text_is_plain_text_unless_allowed(trained: Tokenizer) -> None:
    text = f"end{EOS_TOKEN}start"
    plain = trained.encode(text)
    assert trained.eos_id not in plain and trained.decode(plain) == text
    parsed = trained.encode(text, allow_special_tokens=True)
    assert trained.eos_id in parsed and trained.decode(parsed) == text
    assert trained.decode(parsed, skip_special_tokens=True) == "endstart"


def test_train_rejects_a_vocab_without_room_for_bytes() -> None:
    with pytest.raises(ValueError, match="at least 260"):
        train_bpe_tokenizer(["abc"], vocab_size=259)


def test_save_and_reload_keep_everything(trained: Tokenizer, tmp_path: Path) -> None:
    directory = trained.save(tmp_path / "tok")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["eos_token"], config["bos_token"], config["pad_token"]) == (EOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert config["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]

    for reloaded in (Tokenizer.from_dir(directory), load_tokenizer(str(directory))):
        assert reloaded.fingerprint == trained.fingerprint
        assert (reloaded.eos_id, reloaded.pad_id, reloaded.vocab_size) == (trained.eos_id, trained.pad_id, VOCAB)
        assert reloaded.encode("Some text, once more.") == trained.encode("Some text, once more.")


def test_fingerprint_ignores_formatting_but_not_content(trained: Tokenizer, tmp_path: Path) -> None:
    directory = trained.save(tmp_path / "tok")
    tokenizer_file = directory / "tokenizer.json"
    tokenizer_file.write_text(json.dumps(json.loads(tokenizer_file.read_text()), indent=7))
    assert Tokenizer.from_dir(directory).fingerprint == trained.fingerprint
    other = train_bpe_tokenizer(make_documents(60, seed=1), vocab_size=VOCAB + 10)
    assert other.fingerprint != trained.fingerprint


def test_pickled_tokenizer_still_treats_special_text_as_plain(trained: Tokenizer) -> None:
    import pickle

    copy = pickle.loads(pickle.dumps(trained))
    assert copy.encode(f"a{EOS_TOKEN}") == trained.encode(f"a{EOS_TOKEN}")
    assert copy.eos_id not in copy.encode(f"a{EOS_TOKEN}")


def test_eos_falls_back_to_a_known_name(trained: Tokenizer, tmp_path: Path) -> None:
    directory = trained.save(tmp_path / "tok")
    (directory / "tokenizer_config.json").unlink()
    assert load_tokenizer(directory).eos_token == EOS_TOKEN


def test_tokenizer_without_any_eos_is_refused(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as RawTokenizer, models

    directory = tmp_path / "no_eos"
    directory.mkdir()
    RawTokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(directory / "tokenizer.json"))
    with pytest.raises(DataError) as err:
        load_tokenizer(directory)
    assert str(directory) in str(err.value) and "eos_token" in str(err.value)


def test_directory_without_tokenizer_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_get_tokenizer_trains_once_then_reuses_the_cache(
    tmp_path: Path, write_text_corpus, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    corpus = write_text_corpus(tmp_path / "corpus", make_documents(30, seed=2))
    cfg = DataConfig(path=str(corpus), bpe_vocab_size=300)
    cache_root = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="llmsys.data.tokenizer"):
        first = get_tokenizer(cfg, cache_root)
    assert "Trained a byte-level BPE tokenizer" in caplog.text
    cached_dirs = list((cache_root / "tokenizers").iterdir())
    assert len(cached_dirs) == 1 and (cached_dirs[0] / "tokenizer.json").is_file()

    def must_not_train(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(tokenizer_module, "train_bpe_tokenizer", must_not_train)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llmsys.data.tokenizer"):
        second = get_tokenizer(cfg, cache_root)
    assert "Reusing cached tokenizer" in caplog.text
    assert second.fingerprint == first.fingerprint
    # A configured tokenizer is loaded as is, never trained.
    assert get_tokenizer(DataConfig(path=str(corpus), tokenizer=str(cached_dirs[0])), cache_root).fingerprint \
        == first.fingerprint


def test_saved_directory_loads_in_transformers(trained: Tokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    directory = trained.save(tmp_path / "tok")
    text = "Round trip through transformers, 日本語 😀"
    for hf in (
        transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json")),
        transformers.AutoTokenizer.from_pretrained(str(directory)),
    ):
        assert hf.encode(text, add_special_tokens=False) == trained.encode(text)
    auto = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert (auto.eos_token_id, auto.pad_token_id) == (trained.eos_id, trained.pad_id)
    assert auto.decode(trained.encode(text)) == text
