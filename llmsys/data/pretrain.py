"""Pre-training data: tokenize a corpus once, pack it into flat token files, serve fixed blocks.

Packing follows GPT-2/nanoGPT: every document is tokenized, followed by EOS, and all documents are
concatenated in order into one stream. The first ``1 - val_fraction`` of the stream is written to
``train.bin``, the rest to ``val.bin``, as raw uint16 (vocabularies up to 65535) or uint32, so
training reads them through ``np.memmap`` with no parsing and no per-document padding.

A block is ``seq_len + 1`` consecutive tokens: inputs are the first ``seq_len``, targets the last
``seq_len``. Block ``i`` starts at ``i * seq_len``, so neighbouring blocks share one boundary token
and every token is a target exactly once. Blocks cross document boundaries; the EOS between
documents teaches the model where one ends.

The data order is a pure function of (seed, sample index) (:class:`BlockSampler`), so a checkpoint
needs to store only the optimizer step to resume the exact same stream, at any world size.
"""
from __future__ import annotations

import contextlib
import logging
import operator
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from llmsys.config.schema import DataConfig
from llmsys.data.cache import build_keyed, read_manifest, stable_hash, write_manifest
from llmsys.data.sources import DataError, Source, open_source
from llmsys.data.tokenizer import Tokenizer, tokenizer_for_source

logger = logging.getLogger(__name__)

# Bumped whenever the layout or meaning of the cache directory changes.
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
TOKENIZER_DIR = "tokenizer"

_TOKENIZE_BATCH_DOCS = 1000
_STREAM_BATCH_DOCS = 10_000


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding every id: uint16 halves disk and page-cache use."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


class _TokenizeBatch:
    """`datasets.map` function: drop blank documents, tokenize the rest, end each with EOS.

    A class rather than a closure so that it pickles into the worker processes.
    """

    def __init__(self, tokenizer: Tokenizer, source_description: str, text_field: str) -> None:
        self.tokenizer = tokenizer
        self.source_description = source_description
        self.text_field = text_field

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list[list[int]]]:
        kept = []
        for index, text in zip(indices, batch["text"]):
            if not isinstance(text, str):
                raise DataError(
                    f"{self.source_description}: row {index + 1}: column {self.text_field!r} "
                    f"(data.text_field) is {'null' if text is None else type(text).__name__}, expected a string"
                )
            if text.strip():
                kept.append(text)
        token_ids = self.tokenizer.encode_batch(kept)
        eos = self.tokenizer.eos_id
        for ids in token_ids:
            ids.append(eos)
        return {"input_ids": token_ids}


@contextlib.contextmanager
def _process_parallelism_only(num_proc: int) -> Iterator[None]:
    # `tokenizers` disables (and warns about) its thread pool in forked children once the parent has
    # used it. With num_proc worker processes the processes are the parallelism, so say so up front.
    if num_proc <= 1 or "TOKENIZERS_PARALLELISM" in os.environ:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)


def _read_manifest(cache_dir: Path) -> Optional[dict[str, Any]]:
    """The manifest if ``cache_dir`` is a complete cache of this format, else None."""
    manifest = read_manifest(cache_dir, MANIFEST_FILE, FORMAT_VERSION)
    if manifest is None:
        return None
    try:
        itemsize = np.dtype(manifest["dtype"]).itemsize
        sizes_match = all(
            (cache_dir / file).stat().st_size == int(manifest[count]) * itemsize
            for file, count in ((TRAIN_FILE, "train_tokens"), (VAL_FILE, "val_tokens"))
        )
    except (KeyError, TypeError, ValueError, OSError):
        return None
    if not sizes_match or not (cache_dir / TOKENIZER_DIR / "tokenizer.json").is_file():
        return None
    return manifest


def _write_token_files(tokenized: datasets.Dataset, directory: Path, dtype: np.dtype,
                       val_fraction: float) -> tuple[int, int]:
    """Write the concatenated stream as train.bin + val.bin; return the two token counts."""

    def batches() -> Iterator[Any]:
        return tokenized.with_format("arrow").iter(batch_size=_STREAM_BATCH_DOCS)

    # One pass over the list offsets only (cheap, memory-mapped) to find where validation starts.
    total = sum(pc.sum(pc.list_value_length(batch.column("input_ids"))).as_py() or 0 for batch in batches())
    num_train = int(total * (1.0 - val_fraction))
    written = 0
    with open(directory / TRAIN_FILE, "wb") as train_file, open(directory / VAL_FILE, "wb") as val_file:
        for batch in batches():
            ids = pc.list_flatten(batch.column("input_ids")).to_numpy().astype(dtype, copy=False)
            cut = min(max(num_train - written, 0), len(ids))
            ids[:cut].tofile(train_file)
            ids[cut:].tofile(val_file)
            written += len(ids)
    return num_train, total - num_train


def _build(directory: Path, cfg: DataConfig, source: Source, tokenizer: Tokenizer, key: str,
           source_fingerprint: str) -> None:
    work = directory / "work"  # `datasets` Arrow files; deleted before the directory is published
    documents = source.to_dataset(work)
    if len(documents) == 0:
        raise DataError(f"{source.description}: no documents; expected at least one document with text")
    num_proc = min(cfg.num_proc, len(documents))
    vocab_size = tokenizer.vocab_size
    dtype = token_dtype(vocab_size)
    with _process_parallelism_only(num_proc):
        tokenized = documents.map(
            _TokenizeBatch(tokenizer, source.description, source.text_field),
            batched=True,
            batch_size=_TOKENIZE_BATCH_DOCS,
            with_indices=True,
            remove_columns=documents.column_names,
            num_proc=num_proc if num_proc > 1 else None,
            features=datasets.Features({"input_ids": datasets.List(datasets.Value(dtype.name))}),
            # Keep every intermediate file inside the build directory, never in ~/.cache.
            cache_file_name=str(work / "tokens.arrow"),
            new_fingerprint=key,
            desc="Tokenizing",
        )
    num_documents = len(tokenized)
    if num_documents == 0:
        raise DataError(
            f"{source.description}: no text found; every document is empty or whitespace, "
            f"expected at least one document with text"
        )
    train_tokens, val_tokens = _write_token_files(tokenized, directory, dtype, cfg.val_fraction)
    del tokenized, documents  # release the memory maps before deleting their files
    shutil.rmtree(work)
    tokenizer.save(directory / TOKENIZER_DIR)
    manifest = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "source": source.description,
        "source_fingerprint": source_fingerprint,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": vocab_size,
        "eos_id": tokenizer.eos_id,
        "dtype": dtype.name,
        "num_documents": num_documents,
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "val_fraction": cfg.val_fraction,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_manifest(directory, MANIFEST_FILE, manifest)


def prepare_pretrain_data(cfg: DataConfig, cache_root: Path) -> Path:
    """Tokenize and pack the corpus of ``cfg`` (or reuse an identical earlier result); return its directory."""
    cache_root = Path(cache_root)
    source = open_source(cfg)
    tokenizer = tokenizer_for_source(cfg, source, cache_root)
    fingerprint = source.fingerprint()
    # eos_id is in the key as well: the same vocabulary with another EOS packs a different stream.
    key = stable_hash("pretrain", FORMAT_VERSION, fingerprint, tokenizer.fingerprint, tokenizer.eos_id,
                      cfg.val_fraction)
    final = cache_root / "pretrain" / key
    manifest, built = build_keyed(
        final, key, _read_manifest, lambda directory: _build(directory, cfg, source, tokenizer, key, fingerprint))
    logger.info(
        "%s pretraining data %s: %d documents, %d train tokens, %d val tokens (%s)",
        "Built" if built else "Reusing", final, manifest["num_documents"], manifest["train_tokens"],
        manifest["val_tokens"], manifest["dtype"],
    )
    return final


class TokenBlocks(Dataset):
    """Blocks of ``seq_len + 1`` tokens over a flat token file, read through a read-only memmap.

    Item ``i`` is ``stream[i*seq_len : i*seq_len + seq_len + 1]`` as a ``torch.long`` tensor;
    ``len`` is ``(num_tokens - 1) // seq_len``.
    """

    def __init__(self, path: Path | str, seq_len: int, dtype: np.dtype | str,
                 too_short_hint: str = "use a smaller seq_len") -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.path = Path(path)
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise DataError(f"{self.path}: {size} bytes is not a whole number of {self.dtype.name} tokens "
                            f"(truncated file?)")
        self.num_tokens = size // self.dtype.itemsize
        if self.num_tokens < seq_len + 1:
            raise DataError(
                f"{self.path}: {self.num_tokens} tokens, but seq_len={seq_len} needs at least {seq_len + 1} "
                f"for one block; {too_short_hint}"
            )
        # Opened lazily so that DataLoader workers each map the file instead of pickling its pages.
        self._tokens: Optional[np.memmap] = None

    @property
    def tokens(self) -> np.memmap:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._tokens

    def __len__(self) -> int:
        return (self.num_tokens - 1) // self.seq_len

    def __getitem__(self, index: int) -> torch.Tensor:
        index = operator.index(index)
        length = len(self)
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError(f"block {index} out of range for {length} blocks")
        start = index * self.seq_len
        return torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokens"] = None
        return state


@dataclass
class PretrainData:
    train: TokenBlocks
    val: TokenBlocks
    tokenizer: Tokenizer
    manifest: dict[str, Any]


def load_pretrain_data(cache_dir: Path | str, seq_len: int) -> PretrainData:
    """Open a directory written by :func:`prepare_pretrain_data` as train/val blocks of ``seq_len``."""
    cache_dir = Path(cache_dir)
    manifest = _read_manifest(cache_dir)
    if manifest is None:
        raise DataError(
            f"{cache_dir}: not a complete pretraining cache of format {FORMAT_VERSION} ({MANIFEST_FILE} "
            f"missing or invalid, or token files truncated); run prepare_pretrain_data to build it"
        )
    dtype = manifest["dtype"]
    train = TokenBlocks(cache_dir / TRAIN_FILE, seq_len, dtype,
                        too_short_hint="use a smaller data.seq_len, a smaller data.val_fraction or more text")
    val = TokenBlocks(cache_dir / VAL_FILE, seq_len, dtype,
                      too_short_hint="use a smaller data.seq_len, a larger data.val_fraction or more text")
    return PretrainData(train=train, val=val, tokenizer=Tokenizer.from_dir(cache_dir / TOKENIZER_DIR),
                        manifest=manifest)


class BlockSampler:
    """Stateless, deterministic block order for data-parallel training.

    Global sample ``s`` is block ``perm_e[s % num_blocks]`` of epoch ``e = s // num_blocks``, where
    ``perm_e`` is a permutation drawn from a generator seeded by ``(seed, e)``. Epochs follow each
    other without a gap, so a batch may straddle two epochs and no block is ever dropped.
    """

    # Permutations of the most recent epochs, reused across steps (one epoch spans many steps).
    _CACHED_EPOCHS = 2

    def __init__(self, num_blocks: int, seed: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.seed = seed
        self._permutations: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        perm = self._permutations.get(epoch)
        if perm is None:
            # SeedSequence entropy must be non-negative; fold negative seeds into 64 bits.
            rng = np.random.default_rng([self.seed % (1 << 64), epoch])
            perm = rng.permutation(self.num_blocks)
            if len(self._permutations) >= self._CACHED_EPOCHS:
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = perm
        return perm

    def epoch_of(self, sample: int) -> int:
        return sample // self.num_blocks

    def blocks(self, start: int, stop: int) -> list[int]:
        """Block indices of global samples ``start .. stop - 1``."""
        if not 0 <= start <= stop:
            raise ValueError(f"expected 0 <= start <= stop, got start={start}, stop={stop}")
        result: list[int] = []
        sample = start
        while sample < stop:
            epoch, offset = divmod(sample, self.num_blocks)
            take = min(stop - sample, self.num_blocks - offset)
            result.extend(self.permutation(epoch)[offset:offset + take].tolist())
            sample += take
        return result

    def micro_batches(self, step: int, global_batch: int, micro_batch: int, rank: int,
                      world_size: int) -> list[list[int]]:
        """Block indices of each micro-batch that ``rank`` runs for optimizer step ``step``.

        Step ``step`` consumes global samples ``[step * global_batch, (step + 1) * global_batch)``;
        rank ``r`` takes the ``r``-th of ``world_size`` equal contiguous slices and cuts it into
        micro-batches of ``micro_batch``.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if micro_batch < 1 or global_batch < 1 or global_batch % (micro_batch * world_size):
            raise ValueError(
                f"global batch {global_batch} must be a positive multiple of micro_batch * world_size = "
                f"{micro_batch} * {world_size} = {micro_batch * world_size}"
            )
        per_rank = global_batch // world_size
        first = step * global_batch + rank * per_rank
        mine = self.blocks(first, first + per_rank)
        return [mine[i:i + micro_batch] for i in range(0, per_rank, micro_batch)]


def collate_blocks(blocks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack ``(T + 1)``-token blocks into ``input_ids`` and next-token ``labels``, both ``(B, T)``."""
    if not blocks:
        raise ValueError("collate_blocks needs at least one block")
    stacked = torch.stack(blocks).long()  # (B, T + 1)
    return {"input_ids": stacked[:, :-1].contiguous(), "labels": stacked[:, 1:].contiguous()}
