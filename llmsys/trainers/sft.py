"""Stage 2: supervised fine-tuning on prompt/response or chat data.

Examples are rendered with the chat template, labelled on assistant tokens (and the end-of-turn
token) only, and packed into rows; a micro-batch of rows runs as one packed sequence with
``cu_seqlens``, so no example attends to another. The loop is the shared LM loop.

The tokenizer is the model's own: the ``tokenizer.json`` next to ``model.init_from`` (an llmsys
export or a Hugging Face directory), else ``data.tokenizer``.
"""
from __future__ import annotations

from pathlib import Path

from llmsys.config import Config
from llmsys.data import data_cache_root, load_sft_data, prepare_sft_data
from llmsys.distributed import DistInfo
from llmsys.trainers.components import model_tokenizer, prepare_on_local_main
from llmsys.trainers.lm import LMData, train_lm


def run(cfg: Config, dist: DistInfo) -> dict:
    cache_dir = Path(prepare_on_local_main(dist, lambda: prepare_sft_data(
        cfg.data, data_cache_root(cfg.data), tokenizer=model_tokenizer(cfg))))
    data = load_sft_data(cache_dir)
    train, val = data.packed("train"), data.packed("val")
    return train_lm(cfg, dist, LMData(
        train_size=len(train), collate_train=train.collate, val_size=len(val), collate_val=val.collate,
        tokenizer_dir=cache_dir / "tokenizer", tokenizer_vocab=data.tokenizer.vocab_size, cache_dir=cache_dir,
        max_tokens_per_sample=cfg.data.seq_len))
