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
from llmsys.data import DataError, data_cache_root, load_sft_data, load_tokenizer, prepare_sft_data
from llmsys.distributed import DistInfo, barrier, broadcast_object
from llmsys.trainers.lm import LMData, train_lm


def model_tokenizer(cfg: Config):
    """The tokenizer of the model a stage starts from (every stage after pre-training uses it)."""
    if cfg.model.init_from and (Path(cfg.model.init_from) / "tokenizer.json").is_file():
        return load_tokenizer(cfg.model.init_from)
    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    raise DataError(f"stage={cfg.stage.name} needs the model's tokenizer: set model.init_from to a directory "
                    f"holding tokenizer.json (an llmsys export or a Hugging Face model), or data.tokenizer")


def run(cfg: Config, dist: DistInfo) -> dict:
    cache_dir = None
    if dist.is_local_main:
        cache_dir = prepare_sft_data(cfg.data, data_cache_root(cfg.data), tokenizer=model_tokenizer(cfg))
    barrier()
    cache_dir = Path(broadcast_object(cache_dir))
    data = load_sft_data(cache_dir)
    train, val = data.packed("train"), data.packed("val")
    return train_lm(cfg, dist, LMData(
        train_size=len(train), collate_train=train.collate, val_size=len(val), collate_val=val.collate,
        tokenizer_dir=cache_dir / "tokenizer", tokenizer_vocab=data.tokenizer.vocab_size, cache_dir=cache_dir,
        max_tokens_per_sample=cfg.data.seq_len))
