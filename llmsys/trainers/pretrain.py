"""Stage 1: pre-training by next-token prediction on packed raw text.

The first rank of each node tokenises the corpus (or finds it cached) while the others wait; then
every rank maps the token files and the shared LM loop (:mod:`llmsys.trainers.lm`) trains on
fixed-length blocks.
"""
from __future__ import annotations

from pathlib import Path

from llmsys.config import Config
from llmsys.data import collate_blocks, data_cache_root, load_pretrain_data, prepare_pretrain_data
from llmsys.distributed import DistInfo
from llmsys.trainers.components import prepare_on_local_main
from llmsys.trainers.lm import LMData, train_lm


def run(cfg: Config, dist: DistInfo) -> dict:
    cache_dir = Path(prepare_on_local_main(dist, lambda: prepare_pretrain_data(cfg.data, data_cache_root(cfg.data))))
    data = load_pretrain_data(cache_dir, cfg.data.seq_len)
    return train_lm(cfg, dist, LMData(
        train_size=len(data.train), collate_train=lambda idx: collate_blocks([data.train[i] for i in idx]),
        val_size=len(data.val), collate_val=lambda idx: collate_blocks([data.val[i] for i in idx]),
        tokenizer_dir=cache_dir / "tokenizer", tokenizer_vocab=data.tokenizer.vocab_size, cache_dir=cache_dir,
        max_tokens_per_sample=cfg.data.seq_len))
