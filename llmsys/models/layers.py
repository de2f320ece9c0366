"""The basic layers the decoder and its LoRA adapters build on: a linear map and an embedding table,
each drawing its normal(0, std) init inside its own constructor.

Initialised there rather than by a later ``apply``: under ZeRO-3, ``deepspeed.zero.Init`` partitions a
module's parameters as soon as its constructor returns, so initialisation that runs afterwards would
touch empty shards.
"""
from __future__ import annotations

from torch import nn


class Linear(nn.Linear):
    """Linear layer with a normal(0, std) init done in the constructor (see module doc); bias-free
    unless asked for (Qwen2's q/k/v projections), and then zero-initialised."""

    def __init__(self, in_features: int, out_features: int, std: float, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        nn.init.normal_(self.weight, mean=0.0, std=std)
        if bias:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    """Embedding table with a normal(0, std) init done in the constructor (see module doc)."""

    def __init__(self, num_embeddings: int, dim: int, std: float):
        super().__init__(num_embeddings, dim)
        nn.init.normal_(self.weight, mean=0.0, std=std)
