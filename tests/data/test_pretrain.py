"""Packing, the pre-training cache, token blocks and the data-parallel sample order."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llmsys.config import DataConfig
from llmsys.data import (
    EOS_TOKEN,
    BlockSampler,
    DataError,
    TokenBlocks,
    collate_blocks,
    load_pretrain_data,
    prepare_pretrain_data,
    train_bpe_tokenizer,
)
from llmsys.data.cache import _host_tag

from .corpora import make_documents

VOCAB = 300


def _cfg(corpus: Path, **overrides) -> DataConfig:
    settings = {"bpe_vocab_size": VOCAB, "num_proc": 1, "val_fraction": 0.1, "seq_len": 16}
    settings.update(overrides)
    return DataConfig(path=str(corpus), **settings)


def _stream(cache_dir: Path, dtype: str) -> np.ndarray:
    return np.concatenate([np.fromfile(cache_dir / name, dtype=dtype) for name in ("train.bin", "val.bin")])


@pytest.fixture
def corpus(tmp_path: Path, write_text_corpus) -> Path:
    return write_text_corpus(tmp_path / "corpus", make_documents(40, seed=3))


# -- packing --------------------------------------------------------------------------------------

def test_packed_stream_decodes_to_the_documents(tmp_path: Path, write_text_corpus) -> None:
    documents = make_documents(57, seed=4)
    documents[5] = "   \n"  # blank documents are skipped, never packed as a lone EOS
    corpus = write_text_corpus(tmp_path / "corpus", documents)
    kept = [text for text in documents if text.strip()]

    # Two worker processes: the order must still be the document order.
    cache_dir = prepare_pretrain_data(_cfg(corpus, num_proc=2), tmp_path / "cache")
    data = load_pretrain_data(cache_dir, seq_len=16)
    manifest = data.manifest
    assert manifest["dtype"] == "uint16" and manifest["num_documents"] == len(kept)

    stream = _stream(cache_dir, manifest["dtype"])
    assert len(stream) == manifest["train_tokens"] + manifest["val_tokens"]
    assert manifest["train_tokens"] == int(len(stream) * 0.9)
    assert data.tokenizer.decode(stream.tolist()) == EOS_TOKEN.join(kept) + EOS_TOKEN
    expected = [token for text in kept for token in data.tokenizer.encode(text) + [data.tokenizer.eos_id]]
    assert stream.tolist() == expected


@pytest.mark.parametrize("seq_len", [7, 16])
def test_blocks_are_shifted_slices_of_the_stream(corpus: Path, tmp_path: Path, seq_len: int) -> None:
    cache_dir = prepare_pretrain_data(_cfg(corpus), tmp_path / "cache")
    data = load_pretrain_data(cache_dir, seq_len=seq_len)
    train = np.fromfile(cache_dir / "train.bin", dtype=data.manifest["dtype"]).astype(np.int64)
    assert len(data.train) == (len(train) - 1) // seq_len

    for index in (0, 1, len(data.train) - 1, -1):
        block = data.train[index]
        start = (index % len(data.train)) * seq_len
        assert block.dtype == torch.long and block.shape == (seq_len + 1,)
        assert block.tolist() == train[start:start + seq_len + 1].tolist()
    with pytest.raises(IndexError):
        data.train[len(data.train)]

    batch = collate_blocks([data.train[2], data.train[3]])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, seq_len)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["input_ids"][0].tolist() == train[2 * seq_len:3 * seq_len].tolist()
    assert batch["labels"][0].tolist() == train[2 * seq_len + 1:3 * seq_len + 1].tolist()
    # Neighbouring blocks share one boundary token, so every token is a target exactly once.
    assert batch["labels"][0, -1] == batch["input_ids"][1, 0]


def test_split_too_small_for_one_block_says_what_is_needed(corpus: Path, tmp_path: Path) -> None:
    cache_dir = prepare_pretrain_data(_cfg(corpus), tmp_path / "cache")
    val_tokens = json.loads((cache_dir / "manifest.json").read_text())["val_tokens"]
    with pytest.raises(DataError) as err:
        load_pretrain_data(cache_dir, seq_len=val_tokens)
    message = str(err.value)
    assert "val.bin" in message and f"{val_tokens} tokens" in message and f"at least {val_tokens + 1}" in message
    assert "data.seq_len" in message and "data.val_fraction" in message


def test_blocks_survive_pickling_without_copying_the_file(corpus: Path, tmp_path: Path) -> None:
    import pickle

    data = load_pretrain_data(prepare_pretrain_data(_cfg(corpus), tmp_path / "cache"), seq_len=16)
    first = data.train[0]
    payload = pickle.dumps(data.train)
    assert len(payload) < 2_000  # the memmap is reopened in the worker, not shipped
    assert torch.equal(pickle.loads(payload)[0], first)


# -- the cache ------------------------------------------------------------------------------------

def test_second_prepare_reuses_the_cache(corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache_root = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="llmsys.data.pretrain"):
        first = prepare_pretrain_data(_cfg(corpus), cache_root)
    assert "Built pretraining data" in caplog.text
    mtimes = {path.name: path.stat().st_mtime_ns for path in first.iterdir()}

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llmsys.data.pretrain"):
        second = prepare_pretrain_data(_cfg(corpus, seq_len=32, num_proc=2), cache_root)
    assert second == first  # seq_len and num_proc do not change the packed stream
    assert "Reusing pretraining data" in caplog.text and "Built" not in caplog.text
    assert {path.name: path.stat().st_mtime_ns for path in second.iterdir()} == mtimes
    assert sorted(mtimes) == ["manifest.json", "tokenizer", "train.bin", "val.bin"]


def test_changed_source_file_gets_a_new_cache(corpus: Path, tmp_path: Path) -> None:
    cache_root = tmp_path / "cache"
    first = prepare_pretrain_data(_cfg(corpus), cache_root)
    with open(corpus / "doc_000.txt", "a", encoding="utf-8") as handle:
        handle.write("One more sentence.\n")
    second = prepare_pretrain_data(_cfg(corpus), cache_root)
    assert second != first and first.is_dir()
    assert load_pretrain_data(second, 16).manifest["source_fingerprint"] != \
        load_pretrain_data(first, 16).manifest["source_fingerprint"]


def test_other_tokenizer_or_val_fraction_gets_a_new_cache(corpus: Path, tmp_path: Path) -> None:
    cache_root = tmp_path / "cache"
    trained_here = prepare_pretrain_data(_cfg(corpus), cache_root)
    other_tokenizer = train_bpe_tokenizer(make_documents(30, seed=11), vocab_size=280).save(tmp_path / "other_tok")
    with_other = prepare_pretrain_data(_cfg(corpus, tokenizer=str(other_tokenizer)), cache_root)
    assert with_other != trained_here
    assert load_pretrain_data(with_other, 16).tokenizer.vocab_size == 280
    assert prepare_pretrain_data(_cfg(corpus, val_fraction=0.2), cache_root) not in (trained_here, with_other)


def test_half_written_cache_is_rebuilt(corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache_root = tmp_path / "cache"
    first = prepare_pretrain_data(_cfg(corpus), cache_root)
    expected = (first / "train.bin").read_bytes()
    (first / "manifest.json").unlink()
    (first / "train.bin").write_bytes(expected[: len(expected) // 2])  # as if the writer died
    with pytest.raises(DataError, match="manifest.json"):
        load_pretrain_data(first, 16)

    with caplog.at_level(logging.INFO, logger="llmsys.data.pretrain"):
        second = prepare_pretrain_data(_cfg(corpus), cache_root)
    assert second == first and "Built pretraining data" in caplog.text
    assert (second / "train.bin").read_bytes() == expected
    assert load_pretrain_data(second, 16).manifest["train_tokens"] * 2 == len(expected)


def test_truncated_token_file_invalidates_the_manifest(corpus: Path, tmp_path: Path) -> None:
    cache_dir = prepare_pretrain_data(_cfg(corpus), tmp_path / "cache")
    with open(cache_dir / "val.bin", "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(DataError, match="not a complete pretraining cache"):
        load_pretrain_data(cache_dir, 16)
    rebuilt = prepare_pretrain_data(_cfg(corpus), tmp_path / "cache")
    assert load_pretrain_data(rebuilt, 16).val.num_tokens > 5


def test_stale_temp_dirs_of_dead_builds_are_removed(corpus: Path, tmp_path: Path) -> None:
    cache_root = tmp_path / "cache"
    final = prepare_pretrain_data(_cfg(corpus), cache_root)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    stale = final.with_name(f"{final.name}.tmp-{_host_tag()}-{dead_pid}")
    live = final.with_name(f"{final.name}.tmp-{_host_tag()}-{os.getppid()}")  # a running process
    other_host = final.with_name(f"{final.name}.tmp-someotherhost-{dead_pid}")
    for directory in (stale, live, other_host):
        (directory / "work").mkdir(parents=True)

    assert prepare_pretrain_data(_cfg(corpus), cache_root) == final
    assert not stale.exists()
    assert live.exists() and other_host.exists()  # may still be building


def test_failed_build_leaves_nothing_behind(tmp_path: Path, write_jsonl) -> None:
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "a.jsonl", [{"text": "good row " * 20}])
    cfg = _cfg(corpus)
    cache_root = tmp_path / "cache"
    prepare_pretrain_data(cfg, cache_root)
    write_jsonl(corpus / "b.jsonl", [{"text": "fine"}, {"txt": "typo"}])
    with pytest.raises(DataError, match=r"b\.jsonl:2: no field 'text'"):
        prepare_pretrain_data(cfg, cache_root)
    leftovers = [path.name for path in (cache_root / "tokenizers").iterdir()]
    leftovers += [path.name for path in (cache_root / "pretrain").iterdir()]
    assert not any(".tmp-" in name for name in leftovers)


def test_saved_dataset_source_with_blank_and_null_rows(tmp_path: Path) -> None:
    import datasets

    documents = make_documents(20, seed=5)
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": documents[:10] + ["  "] + documents[10:]}).save_to_disk(str(saved))
    cfg = DataConfig(dataset=str(saved), text_field="body", bpe_vocab_size=VOCAB, num_proc=2, seq_len=8)
    data = load_pretrain_data(prepare_pretrain_data(cfg, tmp_path / "cache"), seq_len=8)
    assert data.manifest["num_documents"] == 20
    assert data.tokenizer.decode(_stream(Path(data.train.path).parent, data.manifest["dtype"]).tolist()) == \
        EOS_TOKEN.join(documents) + EOS_TOKEN

    # With a given tokenizer nothing reads the rows before the tokenizing workers, which must
    # report a bad row from inside their process.
    with_null = tmp_path / "with_null"
    datasets.Dataset.from_dict({"body": documents[:3] + [None]}).save_to_disk(str(with_null))
    tokenizer_dir = data.tokenizer.save(tmp_path / "tok")
    with pytest.raises(DataError, match=r"row 4: column 'body' \(data.text_field\) is null"):
        prepare_pretrain_data(DataConfig(dataset=str(with_null), text_field="body", tokenizer=str(tokenizer_dir),
                                         num_proc=2), tmp_path / "cache")


# -- sample order ---------------------------------------------------------------------------------

@pytest.mark.parametrize("num_blocks, global_batch, micro_batch", [(96, 8, 2), (101, 12, 1), (13, 4, 1)])
def test_every_block_once_per_epoch_for_any_world_size(num_blocks: int, global_batch: int, micro_batch: int) -> None:
    sampler = BlockSampler(num_blocks, seed=17)
    steps = 3 * num_blocks // global_batch + 1  # several epochs, batches straddling epoch ends
    per_world: dict[int, list[list[int]]] = {}
    for world_size in (1, 2, 4):
        if global_batch % (micro_batch * world_size):
            continue
        per_step = []
        for step in range(steps):
            step_blocks: list[int] = []
            for rank in range(world_size):
                micro = sampler.micro_batches(step, global_batch, micro_batch, rank, world_size)
                assert len(micro) == global_batch // (micro_batch * world_size)
                assert all(len(batch) == micro_batch for batch in micro)
                step_blocks.extend(block for batch in micro for block in batch)
            per_step.append(step_blocks)
        per_world[world_size] = per_step

        consumed = [block for step_blocks in per_step for block in step_blocks]
        for epoch_start in range(0, len(consumed) - num_blocks + 1, num_blocks):
            assert sorted(consumed[epoch_start:epoch_start + num_blocks]) == list(range(num_blocks))

    # Same samples per step whatever the world size: a run can resume on a different cluster.
    reference = per_world[1]
    for per_step in per_world.values():
        assert [sorted(blocks) for blocks in per_step] == [sorted(blocks) for blocks in reference]


def test_sampler_is_deterministic_and_seeded() -> None:
    def order(seed: int) -> list[list[int]]:
        sampler = BlockSampler(50, seed)
        return [sampler.micro_batches(step, 20, 5, 1, 2)[1] for step in range(12)]

    assert order(3) == order(3)
    assert order(3) != order(4)
    # Resuming is stateless: a fresh sampler asked for a late step gives the same blocks.
    assert BlockSampler(50, 3).micro_batches(11, 20, 5, 1, 2)[1] == order(3)[11]
    # Epochs are reshuffled rather than repeated.
    sampler = BlockSampler(50, 3)
    assert sampler.blocks(0, 50) != sampler.blocks(50, 100)


def test_micro_batches_validate_their_arguments() -> None:
    sampler = BlockSampler(10, seed=0)
    with pytest.raises(ValueError, match=r"multiple of micro_batch \* world_size = 3 \* 2 = 6"):
        sampler.micro_batches(0, global_batch=8, micro_batch=3, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        sampler.micro_batches(0, global_batch=8, micro_batch=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockSampler(0, seed=0)


def test_token_blocks_refuse_a_file_shorter_than_one_block(tmp_path: Path) -> None:
    path = tmp_path / "tiny.bin"
    np.arange(5, dtype=np.uint16).tofile(path)
    with pytest.raises(DataError, match=r"tiny\.bin: 5 tokens, but seq_len=5 needs at least 6"):
        TokenBlocks(path, seq_len=5, dtype="uint16")
    assert len(TokenBlocks(path, seq_len=4, dtype="uint16")) == 1
