"""Data for every training stage: pre-training, supervised fine-tuning, reward model, DPO, PPO and GRPO.

Reading: ``sources`` reads documents (local .txt/.md/.jsonl/.parquet or a `datasets` source),
``conversations`` reads and checks chat rows (and the split a row may declare), ``chatterbot`` reads
the chatterbot-corpus YAML format. ``embedded`` names the corpora that need no download
(``${llmsys.corpus:NAME}``) and generates the generated ones: ``embedded_prefs`` (the rule-ranked
preference default) and ``embedded_arith`` (the verifiable arithmetic task). ``tokenizer`` loads or
trains the tokenizer, ``templates`` turns conversations into chat-template tokens and owns each
template's end-of-turn token.

Per stage: ``pretrain`` packs token files into a cache and serves blocks; ``sft`` turns
conversations into masked, packed examples; ``preference`` turns ranked answers into (prompt,
chosen, rejected) pairs; ``prompts`` gives the online stages (PPO, GRPO) their prompt sets, with each
prompt row's metadata for the rewards. ``token_cache`` is the chat-token
cache that SFT and preference data share, and ``cache`` holds the atomic, content-addressed cache
directories they all use.
"""
from llmsys.data.cache import data_cache_root
from llmsys.data.conversations import iter_conversations
from llmsys.data.embedded import (
    EMBEDDED_CORPORA,
    GENERATED_CORPORA,
    PREFERENCE_CORPORA,
    SFT_CORPORA,
    embedded_corpus_path,
)
from llmsys.data.embedded_arith import arith_rows, embedded_arith_path
from llmsys.data.embedded_prefs import embedded_prefs_path
from llmsys.data.preference import (
    PreferenceData,
    PreferencePair,
    PreferencePairs,
    collate_pairs,
    iter_preference_rows,
    load_preference_data,
    prepare_preference_data,
)
from llmsys.data.pretrain import (
    BlockSampler,
    PretrainData,
    TokenBlocks,
    collate_blocks,
    load_pretrain_data,
    prepare_pretrain_data,
    token_dtype,
)
from llmsys.data.prompts import PromptSet, iter_prompts, load_prompts, row_metadata
from llmsys.data.sft import (
    PackedSFT,
    SFTData,
    SFTExamples,
    collate_packed,
    collate_padded,
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
from llmsys.data.templates import chat_template_for
from llmsys.data.token_cache import IGNORE_INDEX
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
    "GENERATED_CORPORA",
    "HFDataset",
    "IGNORE_INDEX",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "LocalFiles",
    "PAD_TOKEN",
    "PREFERENCE_CORPORA",
    "PackedSFT",
    "PreferenceData",
    "PreferencePair",
    "PreferencePairs",
    "PretrainData",
    "PromptSet",
    "SFTData",
    "SFTExamples",
    "SFT_CORPORA",
    "SPECIAL_TOKENS",
    "SUPPORTED_EXTENSIONS",
    "TokenBlocks",
    "Tokenizer",
    "arith_rows",
    "chat_template_for",
    "collate_blocks",
    "collate_packed",
    "collate_pairs",
    "collate_padded",
    "data_cache_root",
    "embedded_arith_path",
    "embedded_corpus_path",
    "embedded_prefs_path",
    "get_tokenizer",
    "iter_conversations",
    "iter_documents",
    "iter_preference_rows",
    "iter_prompts",
    "load_preference_data",
    "load_pretrain_data",
    "load_prompts",
    "load_sft_data",
    "load_tokenizer",
    "open_source",
    "pack_examples",
    "prepare_preference_data",
    "prepare_pretrain_data",
    "prepare_sft_data",
    "row_metadata",
    "source_fingerprint",
    "token_dtype",
    "train_bpe_tokenizer",
]
