"""Tokenizers: a thin wrapper over Hugging Face `tokenizers`, loading, BPE training and caching.

The wrapper fixes the few things every stage needs and the raw library leaves open: which token
ends a document (EOS), which one pads, a content fingerprint for cache keys, and a save format
that `transformers` loads (``tokenizer.json`` + ``tokenizer_config.json``), so exported models
work with ``AutoTokenizer``.

``encode`` treats its input as plain text: a corpus that happens to contain the string
``<|endoftext|>`` must not inject a real EOS id into the training stream. Chat templates, which
do want their markers parsed as special tokens, pass ``allow_special_tokens=True``.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from llmsys.config.schema import DataConfig
from llmsys.data.cache import build_once, stable_hash
from llmsys.data.sources import DataError, Source, open_source

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
# Ids 0..3 of every tokenizer trained here. The chat markers are reserved now so that a base model
# pre-trained with this vocabulary can be fine-tuned on chat templates without resizing embeddings.
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

# End-of-document tokens of common model families (GPT-2/NeoX/Qwen, Llama 1-2/Mistral, Llama 3,
# Gemma), tried in this order when a tokenizer directory does not name its eos_token.
KNOWN_EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Bumped when train_bpe_tokenizer's recipe changes, so cached tokenizers are retrained.
_BPE_RECIPE_VERSION = 1
_TRAIN_BATCH_DOCS = 256
# Fields of a source tokenizer_config.json worth carrying into a re-saved one.
_PRESERVED_CONFIG_FIELDS = ("chat_template", "model_max_length")


def _token_content(value: Any) -> Optional[str]:
    """A special-token entry of tokenizer_config.json: a string or an AddedToken-like dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _plain_text_copy(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    copy = tokenizers.Tokenizer.from_str(backend.to_str())
    copy.encode_special_tokens = True
    return copy


class Tokenizer:
    """A `tokenizers.Tokenizer` with known EOS/PAD/BOS tokens and a content fingerprint."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token: str,
        pad_token: Optional[str] = None,
        bos_token: Optional[str] = None,
        extra_config: Optional[dict[str, Any]] = None,
        origin: str = "tokenizer",
    ) -> None:
        for role, token in (("eos_token", eos_token), ("pad_token", pad_token), ("bos_token", bos_token)):
            if token is not None and backend.token_to_id(token) is None:
                raise DataError(f"{origin}: {role} {token!r} is not in the vocabulary")
        self._backend = backend
        self._plain = _plain_text_copy(backend)
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.bos_token = bos_token
        self._extra_config = dict(extra_config or {})
        self._fingerprint: Optional[str] = None

    # -- identity -------------------------------------------------------------------------------

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (special-token strings in input are parsed)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the embedding needs at least this many rows)."""
        with_added = self._backend.get_vocab_size(with_added_tokens=True)
        # Added tokens may sit above a gap in the id range; the embedding must cover the highest id.
        highest = max(self._backend.get_added_tokens_decoder(), default=-1)
        return max(with_added, highest + 1)

    @property
    def eos_id(self) -> int:
        return self._backend.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        """The pad token's id; the EOS id when the tokenizer has no pad token (padding is masked anyway)."""
        return self._backend.token_to_id(self.pad_token) if self.pad_token is not None else self.eos_id

    @property
    def bos_id(self) -> Optional[int]:
        return self._backend.token_to_id(self.bos_token) if self.bos_token is not None else None

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical tokenizer.json (key order and whitespace normalised)."""
        if self._fingerprint is None:
            canonical = json.dumps(
                json.loads(self._backend.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False
            )
            self._fingerprint = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        return self._fingerprint

    def token_to_id(self, token: str) -> Optional[int]:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self._backend.id_to_token(token_id)

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, text: str, *, allow_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``, with no BOS/EOS added."""
        backend = self._backend if allow_special_tokens else self._plain
        return backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, allow_special_tokens: bool = False) -> list[list[int]]:
        backend = self._backend if allow_special_tokens else self._plain
        return [encoding.ids for encoding in backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens are kept by default so that decode inverts encode."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- persistence ----------------------------------------------------------------------------

    def hf_config(self) -> dict[str, Any]:
        """The tokenizer_config.json that lets `transformers` load the saved directory."""
        special = {self.eos_token, self.pad_token, self.bos_token}
        additional = [
            token.content
            for _, token in sorted(self._backend.get_added_tokens_decoder().items())
            if token.special and token.content not in special
        ]
        config: dict[str, Any] = {key: self._extra_config[key] for key in _PRESERVED_CONFIG_FIELDS
                                  if key in self._extra_config}
        config.update({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": None,
            "additional_special_tokens": additional,
            # Pre-training inserts EOS itself; transformers must not add tokens behind our back.
            "add_bos_token": False,
            "add_eos_token": False,
            # Cleaning up spaces would break decode(encode(x)) == x.
            "clean_up_tokenization_spaces": False,
        })
        return config

    def save(self, directory: Path | str) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TOKENIZER_FILE).write_text(self._backend.to_str(pretty=True), encoding="utf-8")
        config = self.hf_config()
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        special_map = {key: config[key] for key in ("bos_token", "eos_token", "pad_token") if config[key]}
        special_map["additional_special_tokens"] = config["additional_special_tokens"]
        (directory / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def from_dir(cls, directory: Path | str) -> "Tokenizer":
        """Load a directory holding tokenizer.json (and, optionally, tokenizer_config.json)."""
        directory = Path(directory).expanduser()
        tokenizer_file = directory / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise DataError(
                f"{directory}: no {TOKENIZER_FILE} (data.tokenizer); expected a directory written by "
                f"Tokenizer.save or a Hugging Face tokenizer directory"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # the Rust loader raises a bare Exception for malformed files
            raise DataError(f"{tokenizer_file}: not a valid tokenizers file ({err})") from None
        config: dict[str, Any] = {}
        config_file = directory / TOKENIZER_CONFIG_FILE
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except ValueError as err:
                raise DataError(f"{config_file}: invalid JSON ({err}); expected a JSON object") from None
            if not isinstance(config, dict):
                raise DataError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
        # Recent transformers versions save the chat template beside tokenizer_config.json, not inside it.
        template_file = directory / CHAT_TEMPLATE_FILE
        if not config.get("chat_template") and template_file.is_file():
            config["chat_template"] = template_file.read_text(encoding="utf-8")
        return _with_roles(backend, config, origin=str(directory))

    # Pickling (datasets' worker processes): the Rust object's encode_special_tokens flag is not
    # part of its pickled state, so rebuild both backends from the JSON.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_backend"] = self._backend.to_str()
        del state["_plain"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._backend = tokenizers.Tokenizer.from_str(state["_backend"])
        self._plain = _plain_text_copy(self._backend)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, pad={self.pad_token!r}, "
                f"fingerprint={self.fingerprint[:12]})")


def _with_roles(backend: tokenizers.Tokenizer, config: dict[str, Any], origin: str) -> Tokenizer:
    """Work out EOS/PAD/BOS from a tokenizer_config.json (possibly empty) and the vocabulary."""
    eos = _token_content(config.get("eos_token"))
    if eos is None:
        eos = next((token for token in KNOWN_EOS_TOKENS if backend.token_to_id(token) is not None), None)
    if eos is None:
        raise DataError(
            f"{origin}: cannot tell the end-of-document token: tokenizer_config.json has no eos_token "
            f"and the vocabulary has none of {', '.join(KNOWN_EOS_TOKENS)}; expected an eos_token entry "
            f"in {TOKENIZER_CONFIG_FILE}"
        )
    pad = _token_content(config.get("pad_token"))
    if pad is None and backend.token_to_id(PAD_TOKEN) is not None:
        pad = PAD_TOKEN
    bos = _token_content(config.get("bos_token"))
    return Tokenizer(backend, eos_token=eos, pad_token=pad, bos_token=bos, extra_config=config, origin=origin)


def load_tokenizer(name_or_path: str | Path) -> Tokenizer:
    """A local tokenizer directory, or a Hugging Face hub name (needs the network or its cache)."""
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise DataError(
                f"{local}: not a directory (data.tokenizer); expected a directory holding {TOKENIZER_FILE}"
            )
        return Tokenizer.from_dir(local)
    try:
        backend = tokenizers.Tokenizer.from_pretrained(str(name_or_path))
    except Exception as err:  # network and hub errors surface as bare Exceptions from Rust
        raise DataError(
            f"{name_or_path}: not a local directory and not loadable from the Hugging Face hub ({err}) "
            f"(data.tokenizer); expected a directory holding {TOKENIZER_FILE} or a hub model name"
        ) from None
    return _with_roles(backend, {}, origin=str(name_or_path))


def _batched(documents: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in documents:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_bpe_tokenizer(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style): any text round-trips, no unknown tokens ever."""
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {minimum} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    backend = tokenizers.Tokenizer(models.BPE())
    # No normaliser: normalising (NFC, lowercasing) would make decode(encode(x)) != x.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # Keeps character offsets aligned with the input text when transformers asks for them.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols are in the vocabulary even if the corpus never uses them.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_batched(documents, _TRAIN_BATCH_DOCS), trainer=trainer)
    return Tokenizer(backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, bos_token=EOS_TOKEN, origin="trained BPE")


def tokenizer_for_source(cfg: DataConfig, source: Source, cache_root: Path) -> Tokenizer:
    """``data.tokenizer`` if set, else a BPE trained on ``source`` and cached by its fingerprint."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    key = stable_hash("bpe", _BPE_RECIPE_VERSION, source.fingerprint(), cfg.bpe_vocab_size, tokenizers.__version__)
    final = Path(cache_root) / "tokenizers" / key

    def is_complete(directory: Path) -> bool:
        return (directory / TOKENIZER_FILE).is_file() and (directory / TOKENIZER_CONFIG_FILE).is_file()

    def build(directory: Path) -> None:
        train_bpe_tokenizer(source.documents(), cfg.bpe_vocab_size).save(directory)

    built = build_once(final, is_complete, build)
    tokenizer = Tokenizer.from_dir(final)
    if built:
        logger.info("Trained a byte-level BPE tokenizer (vocab %d) on %s; cached in %s",
                    tokenizer.vocab_size, source.description, final)
    else:
        logger.info("Reusing cached tokenizer %s (vocab %d)", final, tokenizer.vocab_size)
    return tokenizer


def get_tokenizer(cfg: DataConfig, cache_root: Path) -> Tokenizer:
    """The tokenizer for ``cfg``: loaded from ``data.tokenizer``, or trained once and cached."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    return tokenizer_for_source(cfg, open_source(cfg), cache_root)


def resolve_tokenizer(cfg: DataConfig, tokenizer: Optional[Tokenizer], needed_by: str) -> Tokenizer:
    """``tokenizer``, else ``data.tokenizer`` loaded; ``needed_by`` opens the error when neither is given."""
    if tokenizer is not None:
        return tokenizer
    if not cfg.tokenizer:
        raise DataError(f"{needed_by}: set data.tokenizer (the model's directory holding tokenizer.json) "
                        f"or pass tokenizer=")
    return load_tokenizer(cfg.tokenizer)
