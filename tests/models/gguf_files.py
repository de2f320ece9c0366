"""Tiny GGUF files written the way llama.cpp's converter (``convert_hf_to_gguf.py``) writes them: metadata
under ``<arch>.*`` keys, tensors under GGUF's names, each Llama query/key head's rows reordered for
llama.cpp's interleaved rotary, and a byte-level BPE vocabulary. They let the GGUF tests check every path
in milliseconds; the real SmolLM2 file (tests/models/conftest.py) checks the conventions on a file llama.cpp
wrote."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tokenizers.pre_tokenizers import ByteLevel

from tests.models.conftest import require

require("gguf", "gguf")
require("transformers", "transformers")
import gguf  # noqa: E402  (after the check, which skips or fails with the install command)
import transformers  # noqa: E402

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: control tokens
MERGES = ["h e", "l l", "Ġ t", "Ġt he"]
BOS_ID, EOS_ID = 1, 2

# Odd sizes, grouped-query attention: 4 query heads over 2 kv heads of width 16 (Q8_0 blocks need rows of
# a multiple of 32 elements).
SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=5e5)
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}

_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def vocabulary() -> list[str]:
    """Special tokens, the 256 byte-level symbols, then one token per merge."""
    alphabet = sorted(ByteLevel.alphabet())
    return SPECIAL + alphabet + [merge.replace(" ", "") for merge in MERGES]


def tiny_hf_model(arch: str = "llama", tie: bool = True, seed: int = 0):
    """A random transformers model of ``arch`` with every parameter moved off its init (norms off 1, biases
    off 0), so each tensor's mapping shows in the logits."""
    config_cls, model_cls = (getattr(transformers, name) for name in FAMILIES[arch])
    torch.manual_seed(seed)
    model = model_cls(config_cls(vocab_size=len(vocabulary()), tie_word_embeddings=tie, **SHAPE)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def _interleave_heads(weight: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's converter (LlamaModel.permute): rows (i, i + D/2) of each head -> (2i, 2i + 1).
    return weight.reshape(n_heads, 2, -1, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(hf_model, arch: str) -> dict[str, np.ndarray]:
    """The model's tensors under GGUF names, in the layout llama.cpp writes for ``arch``."""
    cfg = hf_model.config
    out = {}
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = tensor.detach().float().numpy().copy()
        if name in _GLOBAL:
            out[_GLOBAL[name]] = array
            continue
        _, _, layer, rest = name.split(".", 3)  # model.layers.<i>.<module>.<weight|bias>
        module, kind = rest.rsplit(".", 1)
        gguf_name = f"blk.{layer}.{_LAYER[module]}.{kind}"
        if arch == "llama" and _LAYER[module] in ("attn_q", "attn_k"):
            heads = cfg.num_attention_heads if _LAYER[module] == "attn_q" else cfg.num_key_value_heads
            array = _interleave_heads(array, heads)
        out[gguf_name] = array
    return out


def write_gguf(path: Path, hf_model, arch: str = "llama", *, file_arch: Optional[str] = None,
               quantize: bool = False, metadata: Optional[dict[str, Any]] = None,
               tensors: Optional[dict[str, np.ndarray]] = None, chat_template: str = CHATML) -> Path:
    """``hf_model`` as a GGUF file of ``arch`` (``file_arch``: the architecture the file claims), its 2-D
    weights as Q8_0 blocks when ``quantize``; ``metadata`` adds or replaces ``{key: value}`` entries (keys
    without a prefix are read under the architecture's); ``tensors`` replaces the tensor set."""
    cfg = hf_model.config
    file_arch = file_arch or arch
    tokens = vocabulary()
    entries: dict[str, Any] = {
        "block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads,
        "rope.freq_base": SHAPE["rope_theta"], "attention.layer_norm_rms_epsilon": SHAPE["rms_norm_eps"],
        "rope.dimension_count": cfg.hidden_size // cfg.num_attention_heads, "vocab_size": len(tokens),
        **(metadata or {}),
    }
    writer = gguf.GGUFWriter(str(path), file_arch)
    for key, value in entries.items():
        full = key if "." in key and key.split(".")[0] in ("general", "tokenizer", file_arch) else f"{file_arch}.{key}"
        if isinstance(value, bool):
            writer.add_bool(full, value)
        elif isinstance(value, int):
            writer.add_uint32(full, value)
        elif isinstance(value, float):
            writer.add_float32(full, value)
        else:
            writer.add_string(full, value)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_pad_token_id(EOS_ID)
    writer.add_add_bos_token(False)
    writer.add_chat_template(chat_template)
    for name, array in (tensors if tensors is not None else gguf_tensors(hf_model, arch)).items():
        if quantize and array.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
