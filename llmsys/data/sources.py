"""Reading raw documents from local files or a Hugging Face `datasets` source.

A *document* is one unit of text that the packer ends with an EOS token: a whole ``.txt``/``.md``
file, one JSON Lines row, one Parquet row, or one `datasets` row. Documents come in a fixed order
(files sorted by relative path, rows in file order) so that the same corpus always packs into the
same token stream. Documents with no non-whitespace character are skipped: they would only add a
lone EOS.

Bad input fails with :class:`DataError`, whose message names the file (and 1-based line where
there is one), the field and what was expected, because a typo in a 10 GB corpus should not cost
an hour of tokenisation before surfacing as a shape error.

The row-based readers (SFT conversations, preference data) read whole rows instead of one text
field, through :func:`read_jsonl_rows`, :func:`read_parquet_rows` and :func:`row_source_fingerprint`.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from llmsys.config.schema import DataConfig

logger = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS = (".txt", ".md", ".jsonl", ".parquet")
_WHOLE_FILE_EXTENSIONS = (".txt", ".md")

# Rows per Parquet/`datasets` read and documents per Arrow record batch: large enough to amortise
# per-call overhead, small enough that a batch of long documents stays far below 1 GB.
_READ_BATCH_ROWS = 1024
_ARROW_BATCH_BYTES = 64 << 20


class DataError(ValueError):
    """A corpus, dataset or tokenizer cannot be used. The message says where and what was expected."""


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages about JSON rows."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _decode_utf8(raw: bytes, path: Path, line_no: int | None, base_offset: int = 0) -> str:
    """Decode UTF-8, reporting an error by file, line and absolute byte offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        offset = base_offset + err.start
        if line_no is None:
            line_no = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path}:{line_no}: invalid UTF-8 at byte offset {offset} ({err.reason}: "
            f"{raw[err.start:err.end]!r}); expected UTF-8 text"
        ) from None


def _read_whole_file(path: Path) -> str:
    raw = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    return _decode_utf8(raw[bom:], path, None, base_offset=bom)


def read_jsonl_rows(path: Path, expected: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(1-based line, JSON object)`` for every non-blank line of a JSON Lines file.

    Bad UTF-8 (with its byte offset), bad JSON and non-object rows fail with :class:`DataError`
    naming the file and line; ``expected`` says what a row should hold, for that message.
    """
    with path.open("rb") as stream:
        offset = 0
        # Split on b"\n" only: str.splitlines would also break inside strings at U+2028 and friends.
        for line_no, raw in enumerate(stream, start=1):
            start, offset = offset, offset + len(raw)
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
            line = _decode_utf8(raw, path, line_no, base_offset=start)
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{where}: invalid JSON ({err.msg} at column {err.colno}); "
                    f"expected one JSON object per line"
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: got a JSON {json_type(row)}, expected a JSON object with {expected}")
            yield line_no, row


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    for line_no, row in read_jsonl_rows(path, f"a string field {field!r} (data.text_field)"):
        where = f"{path}:{line_no}"
        if field not in row:
            present = ", ".join(map(repr, row)) or "none"
            raise DataError(
                f"{where}: no field {field!r} (data.text_field); fields present: {present}"
            )
        text = row[field]
        if not isinstance(text, str):
            raise DataError(
                f"{where}: field {field!r} (data.text_field) is a JSON {json_type(text)}, "
                f"expected a string"
            )
        yield text


def _is_text_type(arrow_type: pa.DataType) -> bool:
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(arrow_type)
    )


def open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err}); expected a .parquet file") from None


def read_parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for every row of a Parquet file, ``where`` being ``"{path}: row {n}"`` (1-based)."""
    parquet = open_parquet(path)
    row_no = 0
    for batch in parquet.iter_batches(batch_size=_READ_BATCH_ROWS):
        for row in batch.to_pylist():
            row_no += 1
            yield f"{path}: row {row_no}", row


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    parquet = open_parquet(path)
    schema = parquet.schema_arrow
    if field not in schema.names:
        raise DataError(
            f"{path}: no column {field!r} (data.text_field); columns present: "
            f"{', '.join(map(repr, schema.names)) or 'none'}"
        )
    column_type = schema.field(field).type
    if not _is_text_type(column_type):
        raise DataError(f"{path}: column {field!r} (data.text_field) has type {column_type}, expected string")
    row_no = 0
    for batch in parquet.iter_batches(batch_size=_READ_BATCH_ROWS, columns=[field]):
        for text in batch.column(0).to_pylist():
            row_no += 1
            if text is None:
                raise DataError(f"{path}: row {row_no}: column {field!r} (data.text_field) is null, expected a string")
            yield text


def _skip_blank(documents: Iterable[str], description: str) -> Iterator[str]:
    """Drop whitespace-only documents; fail at the end if nothing was left."""
    kept = 0
    for text in documents:
        if text.strip():
            kept += 1
            yield text
    if kept == 0:
        raise DataError(
            f"{description}: no text found; every document is empty or whitespace, "
            f"expected at least one document with text"
        )


def _write_arrow_documents(documents: Iterable[str], path: Path) -> None:
    """Stream documents into an Arrow IPC file (the format `datasets` memory-maps)."""
    schema = pa.schema([("text", pa.large_string())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        pending: list[str] = []
        pending_bytes = 0
        for text in documents:
            pending.append(text)
            pending_bytes += len(text)
            if len(pending) >= _READ_BATCH_ROWS or pending_bytes >= _ARROW_BATCH_BYTES:
                writer.write_batch(pa.record_batch([pa.array(pending, pa.large_string())], schema=schema))
                pending, pending_bytes = [], 0
        if pending:
            writer.write_batch(pa.record_batch([pa.array(pending, pa.large_string())], schema=schema))


def stat_entries(root: Path, files: Iterable[Path]) -> list[list[Any]]:
    entries = []
    for file in files:
        stat = file.stat()
        relative = file.relative_to(root).as_posix() if file != root else file.name
        entries.append([relative, stat.st_size, stat.st_mtime_ns])
    return entries


def list_files(root: Path, extensions: tuple[str, ...] = SUPPORTED_EXTENSIONS) -> tuple[Path, ...]:
    """The files with one of ``extensions`` under ``root`` (or ``root`` itself), in a fixed order."""
    expected = ", ".join(extensions)
    if not root.exists():
        raise DataError(f"{root}: no such file or folder (data.path); expected a {expected} file or a folder of them")
    if root.is_file():
        if root.suffix.lower() not in extensions:
            raise DataError(
                f"{root}: unsupported file type {root.suffix or '(no extension)'!r} (data.path); "
                f"expected one of {expected}, or a folder of them"
            )
        return (root,)
    found = []
    ignored = 0
    for folder, subfolders, names in os.walk(root):
        # Hidden entries are tool state (.git, .ipynb_checkpoints, .DS_Store), never corpus text.
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in names:
            if not name.startswith(".") and Path(name).suffix.lower() in extensions:
                found.append(Path(folder) / name)
            else:
                ignored += 1
    if ignored:
        logger.debug("Ignoring %d hidden or unsupported files under %s", ignored, root)
    if not found:
        raise DataError(f"{root}: folder has no {expected} files (data.path)")
    return tuple(sorted(found, key=lambda file: file.relative_to(root).as_posix()))


@dataclass(frozen=True)
class LocalFiles:
    """``data.path``: one supported file, or every supported file under a folder."""

    root: Path
    files: tuple[Path, ...]
    text_field: str

    @property
    def description(self) -> str:
        return str(self.root)

    def fingerprint(self) -> str:
        # Size and mtime_ns change whenever a file is rewritten, without reading gigabytes to hash them.
        identity = {
            "kind": "files",
            "root": str(self.root.resolve()),
            "text_field": self.text_field,
            "files": stat_entries(self.root, self.files),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()

    def documents(self) -> Iterator[str]:
        return _skip_blank(self._all_documents(), self.description)

    def _all_documents(self) -> Iterator[str]:
        for file in self.files:
            suffix = file.suffix.lower()
            if suffix in _WHOLE_FILE_EXTENSIONS:
                yield _read_whole_file(file)
            elif suffix == ".jsonl":
                yield from _read_jsonl(file, self.text_field)
            else:
                yield from _read_parquet(file, self.text_field)

    def to_dataset(self, work_dir: Path) -> datasets.Dataset:
        """The documents as a `datasets.Dataset` with one ``text`` column, stored in ``work_dir``."""
        work_dir.mkdir(parents=True, exist_ok=True)
        arrow_path = work_dir / "documents.arrow"
        _write_arrow_documents(self.documents(), arrow_path)
        return datasets.Dataset.from_file(str(arrow_path))


def load_hf_dataset(name: str, config_name: str | None, split: str) -> datasets.Dataset:
    local = Path(name).expanduser()
    # `save_to_disk` output is refused by load_dataset ("use load_from_disk"); accept both.
    if local.is_dir() and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(
                    f"{local}: no split {split!r} (data.split); splits present: "
                    f"{', '.join(map(repr, loaded))}"
                )
            loaded = loaded[split]
        return loaded
    loaded = datasets.load_dataset(name, config_name, split=split)
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(
            f"dataset {name!r}: load_dataset returned {type(loaded).__name__}, expected a Dataset "
            f"for split {split!r} (data.split)"
        )
    return loaded


@dataclass(frozen=True)
class HFDataset:
    """``data.dataset``: a `datasets` hub name, a local data folder, or a ``save_to_disk`` folder."""

    name: str
    config_name: str | None
    split: str
    text_field: str
    dataset: datasets.Dataset

    @classmethod
    def load(cls, cfg: DataConfig) -> "HFDataset":
        assert cfg.dataset is not None
        dataset = load_hf_dataset(cfg.dataset, cfg.dataset_config, cfg.split)
        source = cls(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_field, dataset)
        if cfg.text_field not in dataset.column_names:
            raise DataError(
                f"{source.description}: no column {cfg.text_field!r} (data.text_field); columns present: "
                f"{', '.join(map(repr, dataset.column_names)) or 'none'}"
            )
        feature = dataset.features[cfg.text_field]
        if getattr(feature, "dtype", None) not in ("string", "large_string", "string_view"):
            raise DataError(
                f"{source.description}: column {cfg.text_field!r} (data.text_field) is {feature}, "
                f"expected a string column"
            )
        return source

    @property
    def description(self) -> str:
        config = f", config {self.config_name!r}" if self.config_name else ""
        return f"dataset {self.name!r} (split {self.split!r}{config})"

    def fingerprint(self) -> str:
        identity: dict[str, Any] = {
            "kind": "datasets",
            "name": self.name,
            "config": self.config_name,
            "split": self.split,
            "text_field": self.text_field,
            # `datasets` derives this from the builder config and data files (or the saved state).
            "dataset_fingerprint": getattr(self.dataset, "_fingerprint", None),
        }
        local = Path(self.name).expanduser()
        if local.is_dir():
            # A local folder can be rewritten in place; its files' stats catch that.
            files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.as_posix())
            identity["files"] = stat_entries(local, files)
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode("utf-8")).hexdigest()

    def documents(self) -> Iterator[str]:
        return _skip_blank(self._all_documents(), self.description)

    def _all_documents(self) -> Iterator[str]:
        column = self.dataset.select_columns([self.text_field])
        row_no = 0
        for batch in column.iter(batch_size=_READ_BATCH_ROWS):
            for text in batch[self.text_field]:
                row_no += 1
                if not isinstance(text, str):
                    raise DataError(
                        f"{self.description}: row {row_no}: column {self.text_field!r} (data.text_field) "
                        f"is {json_type(text)}, expected a string"
                    )
                yield text

    def to_dataset(self, work_dir: Path) -> datasets.Dataset:
        """The rows as a `datasets.Dataset` whose only column is ``text`` (blank rows not yet dropped)."""
        del work_dir  # already stored by `datasets`; nothing to write
        column = self.dataset.select_columns([self.text_field])
        if self.text_field != "text":
            column = column.rename_column(self.text_field, "text")
        return column


Source = Union[LocalFiles, HFDataset]


def open_source(cfg: DataConfig) -> Source:
    """Resolve ``data.path`` / ``data.dataset`` into a readable source (checks paths and columns)."""
    if cfg.path is not None:
        root = Path(cfg.path).expanduser()
        return LocalFiles(root, list_files(root), cfg.text_field)
    if cfg.dataset is None:
        raise DataError("data.path and data.dataset are both unset; expected exactly one of them")
    return HFDataset.load(cfg)


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """Every non-blank document of the configured corpus, in a deterministic order."""
    return open_source(cfg).documents()


def source_fingerprint(cfg: DataConfig) -> str:
    """A hash that changes whenever the corpus (or the field read from it) changes."""
    return open_source(cfg).fingerprint()


def row_source_fingerprint(cfg: DataConfig, extensions: tuple[str, ...], label: str) -> str:
    """A hash that changes whenever the row files (``extensions``) or dataset of ``cfg`` change.

    For the row-based readers (SFT, preference data), which read whole rows rather than one text
    field: ``label`` takes the place of ``data.text_field`` in the identity hashed.
    """
    if cfg.path is not None:
        root = Path(cfg.path).expanduser()
        return LocalFiles(root, list_files(root, extensions), label).fingerprint()
    assert cfg.dataset is not None
    dataset = load_hf_dataset(cfg.dataset, cfg.dataset_config, cfg.split)
    return HFDataset(cfg.dataset, cfg.dataset_config, cfg.split, label, dataset).fingerprint()
