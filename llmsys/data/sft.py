"""Supervised fine-tuning data: conversations -> template tokens with an exact loss mask, packed rows.

**Input.** ``data.path`` (a .jsonl/.parquet file or a folder of them; also the chatterbot-corpus
YAML files of the embedded default) or ``data.dataset``. Each row is, detected per row, either
``{"prompt", "response"[, "system"]}`` or ``{"messages": [{"role", "content"}, ...]}`` with roles
system/user/assistant (multi-turn). Bad rows fail with :class:`DataError` naming file and line.

**Template.** Built-in ChatML, one turn per message::

    <|im_start|>{role}\\n{content}<|im_end|>\\n

Every piece is tokenized on its own and contents never parse special tokens, so a user writing
"<|im_end|>" gets plain text, not an end-of-turn. The loss covers the assistant contents and the
``<|im_end|>`` closing each assistant turn (so the model learns to stop); the system and user turns,
every ``<|im_start|>assistant\\n`` header and the newline after ``<|im_end|>`` are ignored. With
``data.chat_template=auto`` a tokenizer carrying its own Jinja template (tokenizer_config.json) is
rendered through `transformers`: the assistant span is the text that turn ``i`` adds beyond the
prompt of turns ``< i`` with the generation prompt, trained up to and including its last special
token. (That path tokenizes the rendered text with special tokens parsed, so it cannot guard against
template tokens typed inside user text; the built-in path can.)

**Cache.** Tokenized once into ``<cache>/sft/<key>/``: per split ``{split}_tokens.bin`` (uint16 or
uint32), ``{split}_targets.bin`` (uint8, 1 where the token is a training target) and
``{split}_offsets.npy`` (int64, ``num_examples + 1``), plus ``tokenizer/`` and ``manifest.json``
written last. Examples are split train/val by a seeded permutation (``val_fraction`` of them).

**Packing.** An example of ``L`` tokens occupies ``L`` positions; ``labels[t] = tokens[t + 1]`` where
that token is a target, else -100, and the last position of every example is -100, so no label
crosses an example boundary. :func:`pack_examples` fills rows of at most ``seq_len`` tokens with
whole examples by best-fit decreasing (longest first; each goes into the open row with the least
room that still fits it; ties by index), which is deterministic and wastes little.

**Shared with preference data.** :mod:`llmsys.data.preference` reads and checks rows, builds its
cache and serves it with the same pieces: :func:`iter_source_rows`, :func:`message_fields`,
:func:`check_message`, :func:`resolve_tokenizer`, :func:`prepare_chat_cache`,
:func:`read_chat_manifest`, :func:`write_sequences`, :func:`finish_chat_cache`,
:func:`open_chat_cache` and :class:`SplitSequences`.
"""
from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from llmsys.config.schema import DataConfig
from llmsys.data.cache import build_keyed, read_manifest, stable_hash, write_manifest
from llmsys.data.embedded import CHATTERBOT_EXTENSIONS, read_chatterbot_yaml
from llmsys.data.pretrain import token_dtype
from llmsys.data.sources import (
    DataError,
    json_type,
    list_files,
    load_hf_dataset,
    read_jsonl_rows,
    read_parquet_rows,
    row_source_fingerprint,
)
from llmsys.data.tokenizer import EOS_TOKEN, IM_END_TOKEN, IM_START_TOKEN, PAD_TOKEN, Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
SFT_EXTENSIONS = (".jsonl", ".parquet") + CHATTERBOT_EXTENSIONS

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
_VAL_SPLIT_SEED = 0x5F7  # fixed: the split must not move when the training seed changes

Messages = list[dict[str, str]]


# -- reading rows -----------------------------------------------------------------------------------


def message_fields(message: Any, where: str, label: str) -> tuple[Any, Any]:
    """``(role, content)`` of a chat message object, unchecked; a :class:`DataError` if it is not one."""
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise DataError(f"{where}: {label} is not an object with 'role' and 'content'")
    return message["role"], message["content"]


def check_message(where: str, label: str, role: Any, content: Any) -> None:
    """Fail with a :class:`DataError` (``"{where}: {label} ..."``) unless ``role`` is one of ROLES and ``content`` a string."""
    if role not in ROLES:
        raise DataError(f"{where}: {label} has role {role!r}; expected one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise DataError(f"{where}: {label} ({role}) content is a {json_type(content)}, expected a string")


def row_to_messages(row: Any, where: str) -> Messages:
    """Validate one row (prompt/response or messages form) and return it as chat messages."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: got a {json_type(row)}, expected an object with 'messages' or 'prompt'/'response'")
    if "messages" in row and row["messages"] is not None:
        raw = row["messages"]
        if not isinstance(raw, (list, tuple)):
            raise DataError(f"{where}: field 'messages' is a {json_type(raw)}, expected a list of "
                            f"{{'role', 'content'}} objects")
        messages = []
        for index, message in enumerate(raw):
            role, content = message_fields(message, where, f"messages[{index}]")
            messages.append({"role": role, "content": content})
    elif "prompt" in row and "response" in row:
        messages = []
        if row.get("system") is not None:
            messages.append({"role": "system", "content": row["system"]})
        messages += [{"role": "user", "content": row["prompt"]},
                     {"role": "assistant", "content": row["response"]}]
    else:
        present = ", ".join(repr(key) for key in row) or "none"
        raise DataError(f"{where}: neither 'messages' nor 'prompt' and 'response'; fields present: {present}; "
                        f"expected {{'messages': [...]}} or {{'prompt': ..., 'response': ...}}")
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        check_message(where, f"message {index}", role, content)
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: message {index} is an empty assistant response; expected text")
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: conversation has no assistant turn, so nothing to train on")
    return messages


def iter_source_rows(cfg: DataConfig, extensions: tuple[str, ...], expected: str) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` of every row of ``data.path`` (its ``extensions`` files) / ``data.dataset``, in a fixed order.

    JSON Lines, Parquet and `datasets` rows come as read (objects; ``expected`` says what a JSON Lines
    row should hold, for its error message). A chatterbot YAML conversation comes as its list of
    chat messages, already shaped by :func:`~llmsys.data.embedded.read_chatterbot_yaml`.
    """
    if cfg.path is not None:
        root = Path(cfg.path).expanduser()
        for file in list_files(root, extensions):
            suffix = file.suffix.lower()
            if suffix == ".jsonl":
                for line_no, row in read_jsonl_rows(file, expected):
                    yield f"{file}:{line_no}", row
            elif suffix == ".parquet":
                yield from read_parquet_rows(file)
            else:
                for line_no, messages in read_chatterbot_yaml(file):
                    yield f"{file}:{line_no}", messages
        return
    if cfg.dataset is None:
        raise DataError("data.path and data.dataset are both unset; expected exactly one of them")
    dataset = load_hf_dataset(cfg.dataset, cfg.dataset_config, cfg.split)
    for row_no, row in enumerate(dataset, start=1):
        yield f"dataset {cfg.dataset!r} (split {cfg.split!r}): row {row_no}", row


def iter_conversations(cfg: DataConfig) -> Iterator[tuple[str, Messages]]:
    """``(where, messages)`` for every conversation of ``data.path`` / ``data.dataset``, in a fixed order."""
    for where, row in iter_source_rows(cfg, SFT_EXTENSIONS, "'messages' or 'prompt'/'response'"):
        # A chatterbot conversation is already a message list; every other row is validated.
        yield where, row if isinstance(row, list) else row_to_messages(row, where)


# -- templates -------------------------------------------------------------------------------------


class ChatMLTemplate:
    """The built-in template: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message."""

    name = "chatml"

    def __init__(self, tokenizer: Tokenizer) -> None:
        ids = {token: tokenizer.token_to_id(token) for token in (IM_START_TOKEN, IM_END_TOKEN)}
        missing = [token for token, token_id in ids.items() if token_id is None]
        if missing:
            raise DataError(f"tokenizer has no {', '.join(missing)} token; the built-in ChatML template needs "
                            f"{IM_START_TOKEN} and {IM_END_TOKEN} (llmsys's BPE has them)")
        self.tokenizer = tokenizer
        self.im_start = ids[IM_START_TOKEN]
        self.im_end = ids[IM_END_TOKEN]
        self.newline = tokenizer.encode("\n")
        self.headers = {role: [self.im_start] + tokenizer.encode(f"{role}\n") for role in ROLES}

    def encode(self, messages: Messages) -> tuple[list[int], list[int]]:
        """Token ids and per-token target flags (1 = trained) of a whole conversation."""
        ids: list[int] = []
        targets: list[int] = []
        for message in messages:
            content = self.tokenizer.encode(message["content"])  # never parses special tokens
            trained = int(message["role"] == "assistant")
            header = self.headers[message["role"]]
            ids += header + content + [self.im_end] + self.newline
            targets += [0] * len(header) + [trained] * (len(content) + 1) + [0] * len(self.newline)
        return ids, targets

    def generation_prompt(self, messages: Messages) -> list[int]:
        """The prompt for generating the next assistant turn: the turns, then the assistant header."""
        ids: list[int] = []
        for message in messages:
            ids += self.headers[message["role"]] + self.tokenizer.encode(message["content"]) + [self.im_end]
            ids += self.newline
        return ids + self.headers["assistant"]


class HFChatTemplate:
    """A tokenizer's own Jinja chat template, rendered by `transformers` (see the module docstring)."""

    name = "hf"

    def __init__(self, tokenizer: Tokenizer, template: str) -> None:
        try:
            from transformers import PreTrainedTokenizerFast
        except ImportError:
            raise DataError("the tokenizer has its own chat_template (tokenizer_config.json), which needs "
                            "`transformers` to render; install it, or set data.chat_template=chatml to use "
                            "the built-in template") from None
        self.tokenizer = tokenizer
        self.template = template
        self._hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token=tokenizer.eos_token,
                                           bos_token=tokenizer.bos_token, pad_token=tokenizer.pad_token)
        self._special = {token_id for token_id in tokenizer.backend.get_added_tokens_decoder()}

    def _render(self, messages: Messages, add_generation_prompt: bool) -> str:
        return self._hf.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)

    def encode(self, messages: Messages) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        targets: list[int] = []
        done = ""  # rendered text already turned into ids
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:index], add_generation_prompt=True)
            full = self._render(messages[:index + 1], add_generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise DataError("the tokenizer's chat_template does not render conversations as growing "
                                "prefixes, so the assistant tokens cannot be located; set "
                                "data.chat_template=chatml")
            context = self.tokenizer.encode(prompt[len(done):], allow_special_tokens=True)
            answer = self.tokenizer.encode(full[len(prompt):], allow_special_tokens=True)
            last_special = max((i for i, t in enumerate(answer) if t in self._special), default=len(answer) - 1)
            ids += context + answer
            targets += [0] * len(context) + [1] * (last_special + 1) + [0] * (len(answer) - last_special - 1)
            done = full
        rest = self._render(messages, add_generation_prompt=False)[len(done):]
        tail = self.tokenizer.encode(rest, allow_special_tokens=True) if rest else []
        return ids + tail, targets + [0] * len(tail)

    def generation_prompt(self, messages: Messages) -> list[int]:
        return self.tokenizer.encode(self._render(messages, add_generation_prompt=True), allow_special_tokens=True)


def chat_template_for(tokenizer: Tokenizer, choice: str = "auto") -> ChatMLTemplate | HFChatTemplate:
    """The template ``data.chat_template`` selects for ``tokenizer``."""
    own = tokenizer.hf_config().get("chat_template")
    if choice == "auto" and isinstance(own, str) and own.strip():
        return HFChatTemplate(tokenizer, own)
    return ChatMLTemplate(tokenizer)


# -- chat-token caches (shared with llmsys.data.preference) ---------------------------------------


def resolve_tokenizer(cfg: DataConfig, tokenizer: Optional[Tokenizer], needed_by: str) -> Tokenizer:
    """``tokenizer``, else ``data.tokenizer`` loaded; ``needed_by`` opens the error when neither is given."""
    if tokenizer is not None:
        return tokenizer
    if not cfg.tokenizer:
        raise DataError(f"{needed_by}: set data.tokenizer (the model's directory holding tokenizer.json) "
                        f"or pass tokenizer=")
    return load_tokenizer(cfg.tokenizer)


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


# -- building the cache ----------------------------------------------------------------------------


def _read_manifest(cache_dir: Path) -> Optional[dict[str, Any]]:
    return read_chat_manifest(cache_dir, FORMAT_VERSION, byte_per_token=("targets.bin",), files=("offsets.npy",))


def _build(directory: Path, cfg: DataConfig, tokenizer: Tokenizer, template: Any, key: str,
           fingerprint: str) -> dict[str, Any]:
    examples: list[tuple[list[int], list[int]]] = []
    counts = {"conversations": 0, "kept": 0, "truncated": 0, "dropped": 0}
    for where, messages in iter_conversations(cfg):
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
    counts["kept"] = len(examples)
    if len(examples) < 2:
        raise DataError(f"{cfg.path or cfg.dataset}: {len(examples)} usable conversations after the "
                        f"data.sft_overflow={cfg.sft_overflow} policy (of {counts['conversations']}); "
                        f"expected at least 2 (one for validation)")
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


# -- measurement -----------------------------------------------------------------------------------


def format_and_stop_rate(generations: Sequence[Sequence[int]], tokenizer: Tokenizer) -> dict[str, float]:
    """How often generated assistant turns stop properly and stay well-formed.

    ``generations`` are the token ids generated after the assistant header for held-out prompts.
    ``stopped``: the fraction that end with ``<|im_end|>``. ``well_formed``: the fraction with no
    template token (``<|im_start|>``, ``<|endoftext|>``, ``<|pad|>``, or an ``<|im_end|>`` before the
    end) and some content before the stop. ``both``: stopped and well-formed.
    """
    im_end = tokenizer.token_to_id(IM_END_TOKEN)
    stray = {tokenizer.token_to_id(token) for token in (IM_START_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_END_TOKEN)}
    stray.discard(None)
    n = len(generations)
    if n == 0:
        raise ValueError("format_and_stop_rate needs at least one generation")
    stopped = well_formed = both = 0
    for generation in generations:
        ids = list(generation)
        ends = bool(ids) and ids[-1] == im_end
        body = ids[:-1] if ends else ids
        clean = bool(body) and not any(token in stray for token in body)
        stopped += ends
        well_formed += clean
        both += ends and clean
    return {"n": n, "stopped": stopped / n, "well_formed": well_formed / n, "both": both / n}
