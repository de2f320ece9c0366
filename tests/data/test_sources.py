"""Reading documents: formats, order, fingerprints and every bad-input error."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmsys.config import DataConfig
from llmsys.data import DataError, iter_documents, open_source, source_fingerprint


def _cfg(path: Path, **overrides) -> DataConfig:
    return DataConfig(path=str(path), **overrides)


def _docs(path: Path, **overrides) -> list[str]:
    return list(iter_documents(_cfg(path, **overrides)))


# -- formats and order ------------------------------------------------------------------------------

def test_folder_mixes_formats_in_sorted_order(tmp_path: Path, write_jsonl) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "b_sub").mkdir(parents=True)
    (corpus / "c.md").write_text("# Title\n\nmarkdown body\n", encoding="utf-8")
    (corpus / "a.txt").write_bytes(b"\xef\xbb\xbfwith a BOM\n")
    write_jsonl(corpus / "b_sub" / "rows.jsonl", [{"body": "row one", "id": 1}, "", {"body": "row two"}])
    pq.write_table(pa.table({"body": ["pq one", "   ", "pq two"], "n": [1, 2, 3]}), corpus / "b_sub" / "z.parquet")
    (corpus / "notes.csv").write_text("ignored,because,unsupported\n")
    (corpus / ".hidden.txt").write_text("hidden files are tool state\n")
    (corpus / ".git").mkdir()
    (corpus / ".git" / "x.txt").write_text("never read\n")

    assert _docs(corpus, text_field="body") == [
        "with a BOM\n",
        "row one",
        "row two",
        "pq one",
        "pq two",  # the whitespace-only Parquet row is skipped
        "# Title\n\nmarkdown body\n",
    ]


def test_single_file_and_unicode_text_roundtrip(tmp_path: Path) -> None:
    text = "línea uno\r\nzweite Zeile 😀\n\x00end"
    path = tmp_path / "one.txt"
    path.write_bytes(text.encode("utf-8"))
    assert _docs(path) == [text]


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path: Path) -> None:
    # U+2028 is a line break for str.splitlines but ordinary text inside a JSON string.
    path = tmp_path / "sep.jsonl"
    path.write_text(json.dumps({"text": "before\u2028after"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert _docs(path) == ["before\u2028after"]


def test_fingerprint_tracks_content_and_field(tmp_path: Path, write_text_corpus) -> None:
    corpus = write_text_corpus(tmp_path / "corpus", ["alpha", "beta"])
    before = source_fingerprint(_cfg(corpus))
    assert source_fingerprint(_cfg(corpus)) == before
    assert source_fingerprint(_cfg(corpus, text_field="body")) != before

    target = corpus / "doc_001.txt"
    stat = target.stat()
    target.write_text("gamma", encoding="utf-8")  # same size: only mtime can tell
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    changed = source_fingerprint(_cfg(corpus))
    assert changed != before

    (corpus / "doc_002.txt").write_text("a new file", encoding="utf-8")
    assert source_fingerprint(_cfg(corpus)) not in (before, changed)


# -- `datasets` sources -----------------------------------------------------------------------------

def test_saved_dataset_directory(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"content": ["first doc", "", "second doc"], "title": ["a", "b", "c"]}).save_to_disk(str(saved))
    cfg = DataConfig(dataset=str(saved), text_field="content")
    assert list(iter_documents(cfg)) == ["first doc", "second doc"]
    assert source_fingerprint(cfg) == source_fingerprint(cfg)
    assert source_fingerprint(cfg) != source_fingerprint(DataConfig(dataset=str(saved), text_field="title"))

    with pytest.raises(DataError) as err:
        open_source(DataConfig(dataset=str(saved), text_field="text"))
    message = str(err.value)
    assert str(saved) in message and "'text'" in message and "'content'" in message and "'title'" in message


def test_saved_dataset_dict_picks_the_split(tmp_path: Path) -> None:
    saved = tmp_path / "dict"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["train doc"]}),
        "validation": datasets.Dataset.from_dict({"text": ["val doc"]}),
    }).save_to_disk(str(saved))
    assert list(iter_documents(DataConfig(dataset=str(saved), split="validation"))) == ["val doc"]
    with pytest.raises(DataError, match=r"no split 'test'.*'train', 'validation'"):
        open_source(DataConfig(dataset=str(saved), split="test"))


def test_load_dataset_on_a_local_json_folder(tmp_path: Path, write_jsonl) -> None:
    folder = tmp_path / "json_data"
    write_jsonl(folder / "train.jsonl", [{"text": "from load_dataset", "x": 1}, {"text": "second", "x": 2}])
    cfg = DataConfig(dataset=str(folder), split="train")
    assert list(iter_documents(cfg)) == ["from load_dataset", "second"]
    assert source_fingerprint(cfg) == source_fingerprint(cfg)


def test_dataset_column_must_hold_strings(tmp_path: Path) -> None:
    saved = tmp_path / "numbers"
    datasets.Dataset.from_dict({"text": [1, 2]}).save_to_disk(str(saved))
    with pytest.raises(DataError, match=r"column 'text' \(data.text_field\) is .*int64.*expected a string"):
        open_source(DataConfig(dataset=str(saved)))


# -- errors -----------------------------------------------------------------------------------------

def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        _docs(missing)
    assert str(missing) in str(err.value) and "no such file" in str(err.value)


def test_folder_without_supported_files(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError) as err:
        _docs(folder)
    message = str(err.value)
    assert str(folder) in message
    assert all(ext in message for ext in (".txt", ".md", ".jsonl", ".parquet"))


def test_unsupported_single_file(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: unsupported file type '.csv'")):
        _docs(path)


def test_empty_corpus(tmp_path: Path, write_text_corpus, write_jsonl) -> None:
    corpus = write_text_corpus(tmp_path / "blank", ["", "   \n\t\n"])
    write_jsonl(corpus / "rows.jsonl", [{"text": " "}, ""])
    with pytest.raises(DataError) as err:
        _docs(corpus)
    assert str(corpus) in str(err.value) and "no text found" in str(err.value)


def test_undecodable_text_file_names_file_line_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    raw = b"ok line\nsecond caf\xe9 line\n"
    path.write_bytes(raw)
    with pytest.raises(DataError) as err:
        _docs(path)
    assert f"{path}:2:" in str(err.value) and f"byte offset {raw.index(0xE9)}" in str(err.value)


def test_undecodable_jsonl_line_names_absolute_offset(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    raw = b'{"text": "fine"}\n{"text": "bro\xffken"}\n'
    path.write_bytes(raw)
    with pytest.raises(DataError) as err:
        _docs(path)
    assert f"{path}:2:" in str(err.value) and f"byte offset {raw.index(0xFF)}" in str(err.value)


def test_invalid_json_line(tmp_path: Path, write_jsonl) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "fine"}, "", '{"text": "unterminated'])
    with pytest.raises(DataError) as err:
        _docs(path)
    assert f"{path}:3:" in str(err.value) and "invalid JSON" in str(err.value)


def test_wrong_field_lists_the_fields_present(tmp_path: Path, write_jsonl) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"content": "x", "meta": 1}])
    with pytest.raises(DataError) as err:
        _docs(path)
    message = str(err.value)
    assert f"{path}:1:" in message and "'text'" in message and "'content', 'meta'" in message


@pytest.mark.parametrize(
    "line, expected",
    [
        ('["a", "list"]', "got a JSON array, expected a JSON object"),
        ('"just a string"', "got a JSON string, expected a JSON object"),
        ('{"text": 42}', "field 'text' (data.text_field) is a JSON number, expected a string"),
        ('{"text": null}', "field 'text' (data.text_field) is a JSON null, expected a string"),
        ('{"text": ["a"]}', "is a JSON array, expected a string"),
    ],
)
def test_jsonl_row_shape_errors(tmp_path: Path, write_jsonl, line: str, expected: str) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "fine"}, line])
    with pytest.raises(DataError) as err:
        _docs(path)
    assert f"{path}:2:" in str(err.value) and expected in str(err.value)


def test_parquet_missing_column_and_nulls(tmp_path: Path) -> None:
    path = tmp_path / "table.parquet"
    pq.write_table(pa.table({"body": ["a"]}), path)
    with pytest.raises(DataError) as err:
        _docs(path)
    assert str(path) in str(err.value) and "'text'" in str(err.value) and "'body'" in str(err.value)

    pq.write_table(pa.table({"text": ["a", None]}), path)
    with pytest.raises(DataError, match=re.escape(f"{path}: row 2: column 'text'")):
        _docs(path)


def test_parquet_column_must_be_text(tmp_path: Path) -> None:
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(DataError, match=re.escape(f"{path}: column 'text' (data.text_field) has type int64")):
        _docs(path)
