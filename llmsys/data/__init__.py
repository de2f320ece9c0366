"""Data for every training stage: pre-training and supervised fine-tuning.

``sources`` reads documents (local .txt/.md/.jsonl/.parquet or a `datasets` source), ``tokenizer``
loads or trains the tokenizer, ``sft`` turns conversations into masked, packed examples, ``pretrain`` packs token files into a cache and serves blocks, and
``embedded`` finds corpora shipped inside installed packages. ``cache`` holds the atomic,
content-addressed cache directories they share.
"""
from llmsys.data.cache import data_cache_root
from llmsys.data.embedded import EMBEDDED_CORPORA, SFT_CORPORA, embedded_corpus_path
from llmsys.data.pretrain import (
    BlockSampler,
    PretrainData,
    TokenBlocks,
    collate_blocks,
    load_pretrain_data,
    prepare_pretrain_data,
    token_dtype,
)
from llmsys.data.sft import (
    IGNORE_INDEX,
    PackedSFT,
    SFTData,
    SFTExamples,
    chat_template_for,
    collate_packed,
    collate_padded,
    format_and_stop_rate,
    iter_conversations,
    load_sft_data,
    pack_examples,
    prepare_sft_data,
)
from llmsys.data.sources import (
    SUPPORTED_EXTENSIONS,
    DataError,
    HFDataset,
    LocalFiles,
    iter_documents,
    open_source,
    source_fingerprint,
)
from llmsys.data.tokenizer import (
    EOS_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    Tokenizer,
    get_tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)

__all__ = [
    "BlockSampler",
    "DataError",
    "EMBEDDED_CORPORA",
    "EOS_TOKEN",
    "HFDataset",
    "IGNORE_INDEX",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "LocalFiles",
    "PAD_TOKEN",
    "PackedSFT",
    "PretrainData",
    "SFTData",
    "SFTExamples",
    "SFT_CORPORA",
    "SPECIAL_TOKENS",
    "SUPPORTED_EXTENSIONS",
    "TokenBlocks",
    "Tokenizer",
    "chat_template_for",
    "collate_blocks",
    "collate_packed",
    "collate_padded",
    "data_cache_root",
    "embedded_corpus_path",
    "format_and_stop_rate",
    "get_tokenizer",
    "iter_conversations",
    "iter_documents",
    "load_pretrain_data",
    "load_sft_data",
    "load_tokenizer",
    "open_source",
    "pack_examples",
    "prepare_pretrain_data",
    "prepare_sft_data",
    "source_fingerprint",
    "token_dtype",
    "train_bpe_tokenizer",
]
