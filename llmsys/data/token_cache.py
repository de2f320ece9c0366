"""The chat-token cache shared by SFT and preference data: a keyed directory of token sequences per split.

``<cache>/<kind>/<key>/`` holds, per split (``train``, ``val``), ``{split}_tokens.bin`` (the
sequences concatenated, uint16 or uint32) and ``{split}_offsets.npy`` (int64, ``num_sequences + 1``),
plus what the kind adds (SFT: per-token target flags; preference: pairs and prompts), ``tokenizer/``
and ``manifest.json``, written last. ``key`` hashes the source, the tokenizer, the chat template and
the settings the tokens depend on (:func:`prepare_chat_cache`), so a changed input gets a new
directory; the directory appears atomically (:func:`llmsys.data.cache.build_keyed`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from llmsys.config.schema import DataConfig
from llmsys.data.cache import build_keyed, read_manifest, stable_hash, write_manifest
from llmsys.data.embedded import prepare_generated_corpus
from llmsys.data.sources import DataError, row_source_fingerprint
from llmsys.data.templates import HFChatTemplate, chat_template_for
from llmsys.data.tokenizer import Tokenizer

IGNORE_INDEX = -100  # the label of a position that predicts no target (torch's cross-entropy default)
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")


def read_chat_manifest(cache_dir: Path, format_version: int, byte_per_token: Sequence[str] = (),
                       files: Sequence[str] = ()) -> Optional[dict[str, Any]]:
    """The manifest of ``cache_dir`` if it is a complete chat-token cache of ``format_version``, else None.

    Complete: per split, ``{split}_tokens.bin`` holds the manifest's ``{split}_tokens`` tokens of its
    ``dtype``, each ``{split}_{name}`` of ``byte_per_token`` one byte per token, each of ``files`` is
    present; and so is ``tokenizer/tokenizer.json``.
    """
    manifest = read_manifest(cache_dir, MANIFEST_FILE, format_version)
    if manifest is None:
        return None
    try:
        itemsize = np.dtype(manifest["dtype"]).itemsize
        for split in SPLITS:
            tokens = int(manifest[f"{split}_tokens"])
            if ((cache_dir / f"{split}_tokens.bin").stat().st_size != tokens * itemsize
                    or any((cache_dir / f"{split}_{name}").stat().st_size != tokens for name in byte_per_token)
                    or not all((cache_dir / f"{split}_{name}").is_file() for name in files)):
                return None
    except (KeyError, TypeError, ValueError, OSError):
        return None
    if not (cache_dir / TOKENIZER_DIR / "tokenizer.json").is_file():
        return None
    return manifest


# build(directory, cfg, tokenizer, template, key, source fingerprint) -> manifest
ChatCacheBuilder = Callable[[Path, DataConfig, Tokenizer, Any, str, str], dict[str, Any]]


def prepare_chat_cache(kind: str, format_version: int, cfg: DataConfig, cache_root: Path | str,
                       tokenizer: Tokenizer, extensions: tuple[str, ...],
                       read: Callable[[Path], Optional[dict[str, Any]]],
                       build: ChatCacheBuilder) -> tuple[Path, dict[str, Any], bool]:
    """Build (or reuse) ``<cache_root>/<kind>/<key>/`` from the rows of ``cfg``; return ``(directory, manifest, built)``.

    ``key`` hashes ``kind``, ``format_version``, the source (its ``extensions`` files or dataset), the
    tokenizer, the chat template of ``data.chat_template`` (a tokenizer's own: its Jinja text; else
    its name), ``seq_len``, ``sft_overflow`` and ``val_fraction``. ``read`` validates a directory
    (:func:`read_chat_manifest`); ``build`` fills one and returns its manifest.
    """
    template = chat_template_for(tokenizer, cfg.chat_template)
    if cfg.path is not None:
        prepare_generated_corpus(cfg.path)  # data=prefs: the file must exist before it is fingerprinted
    fingerprint = row_source_fingerprint(cfg, extensions, kind)
    template_id = template.template if isinstance(template, HFChatTemplate) else template.name
    key = stable_hash(kind, format_version, fingerprint, tokenizer.fingerprint, template_id, cfg.seq_len,
                      cfg.sft_overflow, cfg.val_fraction)
    final = Path(cache_root) / kind / key
    manifest, built = build_keyed(
        final, key, read, lambda directory: build(directory, cfg, tokenizer, template, key, fingerprint))
    return final, manifest, built


def write_sequences(directory: Path, split: str, sequences: Sequence[Sequence[int]], dtype: np.dtype) -> int:
    """Write ``{split}_tokens.bin`` (the sequences concatenated) and ``{split}_offsets.npy``; return the token count."""
    lengths = np.array([len(ids) for ids in sequences], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    np.array([t for ids in sequences for t in ids], dtype=dtype).tofile(directory / f"{split}_tokens.bin")
    np.save(directory / f"{split}_offsets.npy", offsets)
    return int(offsets[-1])


def finish_chat_cache(directory: Path, manifest: dict[str, Any], cfg: DataConfig, tokenizer: Tokenizer,
                      template: Any, fingerprint: str, counts: dict[str, int]) -> dict[str, Any]:
    """Save the tokenizer, add the build settings to ``manifest`` and write it (last); return it."""
    tokenizer.save(directory / TOKENIZER_DIR)
    manifest.update({
        "source": str(cfg.path or cfg.dataset),
        "source_fingerprint": fingerprint,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "template": template.name,
        "seq_len": cfg.seq_len,
        "sft_overflow": cfg.sft_overflow,
        "val_fraction": cfg.val_fraction,
        "counts": counts,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    write_manifest(directory, MANIFEST_FILE, manifest)
    return manifest


def open_chat_cache(cache_dir: Path | str, read: Callable[[Path], Optional[dict[str, Any]]], format_version: int,
                    what: str, hint: str, split_class: Callable[[Path, str, str], Any]
                    ) -> tuple[Any, Any, Tokenizer, dict[str, Any]]:
    """``(train, val, tokenizer, manifest)`` of a complete cache, the splits as ``split_class(dir, split, dtype)``.

    An incomplete one fails with a :class:`DataError` naming it a ``what`` cache and ending with ``hint``.
    """
    cache_dir = Path(cache_dir)
    manifest = read(cache_dir)
    if manifest is None:
        raise DataError(f"{cache_dir}: not a complete {what} cache of format {format_version} ({MANIFEST_FILE} "
                        f"missing or invalid, or files truncated); {hint}")
    return (split_class(cache_dir, "train", manifest["dtype"]), split_class(cache_dir, "val", manifest["dtype"]),
            Tokenizer.from_dir(cache_dir / TOKENIZER_DIR), manifest)


class SplitSequences:
    """The token sequences of one split of a chat-token cache (SFT examples, preference sequences).

    Sequence ``i`` is ``{split}_tokens.bin[offsets[i]:offsets[i + 1]]`` (``{split}_offsets.npy``).
    """

    def __init__(self, directory: Path, split: str, dtype: str) -> None:
        self.directory = Path(directory)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.offsets = np.load(self.directory / f"{split}_offsets.npy")
        self._tokens: Optional[np.memmap] = None

    def _map(self, name: str, dtype: Any) -> np.memmap:
        """``{split}_{name}``, one ``dtype`` item per token, memory-mapped read-only."""
        total = int(self.offsets[-1])
        return np.memmap(self.directory / f"{self.split}_{name}", dtype, "r", shape=(total,))

    def sequence(self, index: int) -> np.ndarray:
        """The token ids of sequence ``index`` (int64)."""
        # Mapped lazily so that DataLoader workers each map the file instead of pickling pages.
        if self._tokens is None:
            self._tokens = self._map("tokens.bin", self.dtype)
        return self._tokens[int(self.offsets[index]):int(self.offsets[index + 1])].astype(np.int64)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}
