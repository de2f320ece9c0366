"""Supervised fine-tuning data: conversations -> template tokens with an exact loss mask, packed rows.

**Input.** ``data.path`` (a .jsonl/.parquet file or a folder of them; also the chatterbot-corpus
YAML files of the embedded default) or ``data.dataset``, read and checked as conversations by
:mod:`llmsys.data.conversations` and encoded by the chat template of ``data.chat_template``
(:mod:`llmsys.data.templates`), which flags the tokens the loss covers: the assistant contents and
the end-of-turn token closing each assistant turn (so the model learns to stop).

**Cache.** Tokenized once into ``<cache>/sft/<key>/`` (a chat-token cache,
:mod:`llmsys.data.token_cache`): per split ``{split}_tokens.bin`` (uint16 or uint32),
``{split}_targets.bin`` (uint8, 1 where the token is a training target) and ``{split}_offsets.npy``
(int64, ``num_examples + 1``), plus ``tokenizer/`` and ``manifest.json`` written last. Examples are
split train/val by a seeded permutation (``val_fraction`` of them), unless the rows declare their split
(``"split": "train"|"val"``, :mod:`llmsys.data.conversations`): then each goes to its declared split.

**Packing.** An example of ``L`` tokens occupies ``L`` positions; ``labels[t] = tokens[t + 1]`` where
that token is a target, else -100, and the last position of every example is -100, so no label
crosses an example boundary. :func:`pack_examples` fills rows of at most ``seq_len`` tokens with
whole examples by best-fit decreasing (longest first; each goes into the open row with the least
room that still fits it; ties by index), which is deterministic and wastes little.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from llmsys.config.schema import DataConfig
from llmsys.data.conversations import SFT_EXTENSIONS, check_declared_split, iter_split_conversations
from llmsys.data.pretrain import token_dtype
from llmsys.data.sources import DataError
from llmsys.data.token_cache import (
    IGNORE_INDEX,
    SPLITS,
    SplitSequences,
    finish_chat_cache,
    open_chat_cache,
    prepare_chat_cache,
    read_chat_manifest,
    write_sequences,
)
from llmsys.data.tokenizer import Tokenizer, resolve_tokenizer

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: a row's own "split" field decides its split (older caches split by hash only)
_VAL_SPLIT_SEED = 0x5F7  # fixed: the split must not move when the training seed changes


# -- building the cache ----------------------------------------------------------------------------


def _read_manifest(cache_dir: Path) -> Optional[dict[str, Any]]:
    return read_chat_manifest(cache_dir, FORMAT_VERSION, byte_per_token=("targets.bin",), files=("offsets.npy",))


def _build(directory: Path, cfg: DataConfig, tokenizer: Tokenizer, template: Any, key: str,
           fingerprint: str) -> dict[str, Any]:
    examples: list[tuple[list[int], list[int]]] = []
    declared: list[str | None] = []  # the split each kept example's row declares, None when rows declare none
    counts = {"conversations": 0, "kept": 0, "truncated": 0, "dropped": 0}
    for where, messages, split in iter_split_conversations(cfg):
        counts["conversations"] += 1
        ids, targets = template.encode(messages)
        if len(ids) > cfg.seq_len:
            if cfg.sft_overflow == "drop":
                counts["dropped"] += 1
                continue
            ids, targets = ids[:cfg.seq_len], targets[:cfg.seq_len]
            # targets[0] is never a label (nothing precedes it), so it does not count.
            if not any(targets[1:]):
                counts["dropped"] += 1
                continue
            counts["truncated"] += 1
        examples.append((ids, targets))
        declared.append(split)
    counts["kept"] = len(examples)
    if len(examples) < 2:
        raise DataError(f"{cfg.path or cfg.dataset}: {len(examples)} usable conversations after the "
                        f"data.sft_overflow={cfg.sft_overflow} policy (of {counts['conversations']}); "
                        f"expected at least 2 (one for validation)")
    if declared[0] is not None:
        val_set = {i for i, split in enumerate(declared) if split == "val"}
        check_declared_split(len(val_set), len(examples), str(cfg.path or cfg.dataset), "usable conversations")
    else:
        num_val = max(1, int(round(len(examples) * cfg.val_fraction)))
        order = np.random.default_rng(_VAL_SPLIT_SEED).permutation(len(examples))
        val_set = set(order[:num_val].tolist())
    dtype = token_dtype(tokenizer.vocab_size)
    manifest: dict[str, Any] = {"format_version": FORMAT_VERSION, "key": key, "dtype": dtype.name}
    for split in SPLITS:
        chosen = [examples[i] for i in range(len(examples)) if (i in val_set) == (split == "val")]
        tokens = write_sequences(directory, split, [ids for ids, _ in chosen], dtype)
        np.array([m for _, mask in chosen for m in mask], dtype=np.uint8).tofile(directory / f"{split}_targets.bin")
        manifest[f"{split}_examples"] = len(chosen)
        manifest[f"{split}_tokens"] = tokens
    return finish_chat_cache(directory, manifest, cfg, tokenizer, template, fingerprint, counts)


def prepare_sft_data(cfg: DataConfig, cache_root: Path | str, tokenizer: Optional[Tokenizer] = None) -> Path:
    """Tokenize the conversations of ``cfg`` once (or reuse an identical earlier result); return the directory.

    ``tokenizer`` must be the one of the model being fine-tuned; without it ``data.tokenizer`` is loaded.
    """
    tokenizer = resolve_tokenizer(cfg, tokenizer, "SFT needs the tokenizer of the model it fine-tunes")
    final, manifest, built = prepare_chat_cache("sft", FORMAT_VERSION, cfg, cache_root, tokenizer, SFT_EXTENSIONS,
                                                _read_manifest, _build)
    counts = manifest["counts"]
    logger.info(
        "%s SFT data %s (%s template): %d conversations -> kept %d (truncated %d), dropped %d "
        "(data.sft_overflow=%s, seq_len %d); %d train / %d val examples",
        "Built" if built else "Reusing", final, manifest["template"], counts["conversations"], counts["kept"],
        counts["truncated"], counts["dropped"], manifest["sft_overflow"], manifest["seq_len"],
        manifest["train_examples"], manifest["val_examples"],
    )
    return final


# -- serving ---------------------------------------------------------------------------------------


class SFTExamples(SplitSequences):
    """One split of a cache: example ``i`` as ``(input_ids, labels)`` long tensors of its length ``L``."""

    def __init__(self, directory: Path, split: str, dtype: str) -> None:
        super().__init__(directory, split, dtype)
        self.lengths = np.diff(self.offsets)
        self._targets: Optional[np.memmap] = None

    def __len__(self) -> int:
        return len(self.lengths)

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and target flags of example ``index``."""
        if self._targets is None:  # mapped lazily, as the tokens
            self._targets = self._map("targets.bin", np.uint8)
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.sequence(index), self._targets[start:stop].astype(bool)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range for {len(self)} examples")
        ids, targets = self.raw(index)
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        labels[:-1] = np.where(targets[1:], ids[1:], IGNORE_INDEX)  # shifted; last position: -100
        return torch.from_numpy(ids), torch.from_numpy(labels)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_targets": None}


def pack_examples(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Example indices of each packed row: best-fit decreasing into rows of at most ``seq_len`` tokens."""
    lengths = [int(length) for length in lengths]
    too_long = [i for i, length in enumerate(lengths) if length > seq_len]
    if too_long:
        raise ValueError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens > seq_len={seq_len}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for index in order:
        slot = bisect.bisect_left(room, (lengths[index], -1))
        if slot < len(room):
            free, row = room.pop(slot)
        else:
            free, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(index)
        if free - lengths[index] > 0:
            bisect.insort(room, (free - lengths[index], row))
    return rows


class PackedSFT:
    """Packed rows over one split; the sample a :class:`~llmsys.data.BlockSampler` indexes is a row."""

    def __init__(self, examples: SFTExamples, seq_len: int) -> None:
        self.examples = examples
        self.seq_len = seq_len
        self.rows = pack_examples(examples.lengths, seq_len)

    def __len__(self) -> int:
        return len(self.rows)

    def collate(self, row_indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The rows as ONE packed sequence: ``input_ids``/``labels`` ``(1, T)``, ``cu_seqlens`` int32 ``(S + 1,)``.

        T is at most ``len(row_indices) * seq_len``; each example is its own sequence, so several rows
        can share one forward pass (``Transformer.forward(input_ids, labels, cu_seqlens=...)``).
        """
        return collate_packed(self.examples, [i for row in row_indices for i in self.rows[row]])


def collate_packed(examples: SFTExamples, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """Examples ``indices`` concatenated into one packed row with their ``cu_seqlens``."""
    if not indices:
        raise ValueError("collate_packed needs at least one example")
    pairs = [examples[i] for i in indices]
    lengths = torch.tensor([len(ids) for ids, _ in pairs])
    cu_seqlens = torch.zeros(len(pairs) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    return {"input_ids": torch.cat([ids for ids, _ in pairs])[None],
            "labels": torch.cat([labels for _, labels in pairs])[None],
            "cu_seqlens": cu_seqlens}


def collate_padded(examples: SFTExamples, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Examples ``indices`` right-padded to the longest: ``input_ids``/``labels`` ``(B, T_max)``, -100 on padding."""
    if not indices:
        raise ValueError("collate_padded needs at least one example")
    pairs = [examples[i] for i in indices]
    width = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, example_labels) in enumerate(pairs):
        input_ids[row, :len(ids)] = ids
        labels[row, :len(ids)] = example_labels
    return {"input_ids": input_ids, "labels": labels}


@dataclass
class SFTData:
    train: SFTExamples
    val: SFTExamples
    tokenizer: Tokenizer
    manifest: dict[str, Any]

    def packed(self, split: str = "train", seq_len: Optional[int] = None) -> PackedSFT:
        """Packed rows of ``split`` (default ``seq_len``: the one the cache was built with)."""
        return PackedSFT(getattr(self, split), seq_len or int(self.manifest["seq_len"]))


def load_sft_data(cache_dir: Path | str) -> SFTData:
    """Open a directory written by :func:`prepare_sft_data` (memory-mapped; instant)."""
    return SFTData(*open_chat_cache(cache_dir, _read_manifest, FORMAT_VERSION, "SFT",
                                    "run prepare_sft_data to build it", SFTExamples))
