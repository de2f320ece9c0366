"""LoRA: low-rank adapters on the block projections (Hu et al. 2021, arXiv:2106.09685).

A targeted projection computes ``W x + (alpha / r) * B (A dropout(x))`` with W (out, in) frozen,
A (r, in) drawn like nn.Linear's default weight (Kaiming-uniform, a = sqrt(5)) and B (out, r) zero, so
the adapted model starts exactly at the base model (paper, section 4.1). With ``model.lora.rank > 0``
every other parameter of the Transformer (embeddings, norms, head, biases) is frozen too, so the
optimizer (and ZeRO's gradient and optimizer-state partitions) hold the adapters only.

Own implementation, not `peft`: peft wraps a finished model by replacing its modules, which under
ZeRO-3 would run after ``deepspeed.zero.Init`` has already partitioned the base weights (and peft is
not a dependency). Here the adapters are ordinary parameters created in the constructor of
:class:`LoRALinear`, so zero.Init partitions them like any other weight, and the state dict keeps the
base names (``layers.0.attention.wq.weight``) with the adapters beside them (``...wq.lora_A``).

The export is a plain model: :func:`merge_lora_state` folds ``(alpha / r) * B @ A`` into W and drops
the adapter tensors, so ``model.init_from``, ``llmsys.models.hf export`` and transformers read it
unchanged.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from llmsys.config import LoRAConfig, ModelConfig
from llmsys.models.layers import Linear

ADAPTER_NAMES = ("lora_A", "lora_B")


def is_lora_param(name: str) -> bool:
    """Whether a parameter (state-dict) name is an adapter matrix."""
    return name.rsplit(".", 1)[-1] in ADAPTER_NAMES


class LoRALinear(Linear):
    """A frozen :class:`Linear` plus a trainable rank-r update; parameters weight (, bias), lora_A, lora_B."""

    def __init__(self, in_features: int, out_features: int, std: float, lora: LoRAConfig, bias: bool = False):
        super().__init__(in_features, out_features, std, bias=bias)
        if lora.rank <= 0:
            raise ValueError(f"LoRALinear needs model.lora.rank > 0, got {lora.rank}")
        self.weight.requires_grad_(False)
        if bias:
            self.bias.requires_grad_(False)
        self.rank, self.scaling = lora.rank, lora.alpha / lora.rank
        # Initialised here, not later: zero.Init partitions the parameters when the constructor returns.
        self.lora_A = nn.Parameter(torch.empty(lora.rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, lora.rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(lora.dropout) if lora.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (..., r) -> (..., out); never forms the (out, in) product B @ A.
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return super().forward(x) + update * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank={self.rank}, lora_scaling={self.scaling:g}"


def linear(cfg: ModelConfig, target: str, in_features: int, out_features: int, std: float,
           bias: bool = False) -> Linear:
    """The projection called ``target`` (wq, ..., w3): a :class:`LoRALinear` when LoRA targets it."""
    if cfg.lora.rank > 0 and target in cfg.lora.targets:
        return LoRALinear(in_features, out_features, std, cfg.lora, bias=bias)
    return Linear(in_features, out_features, std, bias=bias)


def freeze_base(model: nn.Module) -> None:
    """Freeze every parameter that is not an adapter (embeddings, norms, head, biases, base weights)."""
    for name, p in model.named_parameters():
        if not is_lora_param(name):
            p.requires_grad_(False)


def lora_parameter_count(cfg: ModelConfig) -> int:
    """Closed-form number of adapter parameters: r * (in + out) per targeted projection per block."""
    if cfg.lora.rank == 0:
        return 0
    q, kv, d, h = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.dim, cfg.hidden_dim
    shapes = {"wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d), "w1": (d, h), "w3": (d, h), "w2": (h, d)}
    per_layer = sum(sum(shapes[t]) for t in cfg.lora.targets)
    return cfg.n_layers * cfg.lora.rank * per_layer


def merge_lora_state(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The state with every adapter folded into its base weight, W' = W + (alpha / r) * B @ A.

    Computed in fp32 and cast back to W's dtype; the adapter tensors are not in the result. A state
    without adapters is returned as a (shallow) copy.
    """
    merged = {k: v for k, v in state.items() if not is_lora_param(k)}
    for name in state:
        if not name.endswith(".lora_A"):
            continue
        prefix = name[: -len(".lora_A")]
        a, b, w = state[name], state.get(f"{prefix}.lora_B"), state.get(f"{prefix}.weight")
        if b is None or w is None:
            raise KeyError(f"{name}: the state lacks {prefix}.lora_B or {prefix}.weight")
        if cfg.lora.rank <= 0 or a.shape[0] != cfg.lora.rank:
            raise ValueError(f"{name} has rank {a.shape[0]}, but model.lora.rank={cfg.lora.rank}")
        if tuple(b.shape) != (w.shape[0], a.shape[0]) or a.shape[1] != w.shape[1]:
            raise ValueError(f"{prefix}: adapter shapes B {tuple(b.shape)} @ A {tuple(a.shape)} "
                             f"do not match the weight {tuple(w.shape)}")
        scaling = cfg.lora.alpha / cfg.lora.rank
        delta = b.to(torch.float32) @ a.to(torch.float32)
        merged[f"{prefix}.weight"] = (w.to(torch.float32) + scaling * delta).to(w.dtype)
    orphans = [k for k in state if k.endswith(".lora_B") and f"{k[: -len('.lora_B')]}.lora_A" not in state]
    if orphans:
        raise KeyError(f"adapters without their lora_A: {orphans[:3]}")
    return merged
