"""Scalar heads on the decoder: the reward model and the PPO critic (value model).

:class:`ScalarHeadModel` is the Llama-family decoder trunk (:class:`~llmsys.models.transformer.Decoder`,
no LM head) with a linear map from the final hidden state to one number per position. Its parameter
names are the trunk's own (``tok_embeddings.*``, ``layers.*``, ``norm.*``) plus ``score.weight`` /
``score.bias``, so it starts from any LM export (the LM's ``output.weight`` unused, the head freshly
initialised) or from a reward export (head included).

- Reward model (InstructGPT, Ouyang et al. 2022, sec. 3.5): the score of a (prompt, response)
  sequence is the head's output at the response's last token (the end-of-turn token).
- Critic: the head's output at every position is V(s_t), the value of the state before the token at
  t + 1 is generated.

An export carries ``"head": "scalar"`` in its config.json, next to the decoder's architecture.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from llmsys.config import ModelConfig
from llmsys.models.export import CONFIG_NAME
from llmsys.models.lora import freeze_base
from llmsys.models.transformer import Decoder

HEAD_KEY = "head"
SCALAR_HEAD = "scalar"
SCORE_PREFIX = "score."


# Offset from the run's seed of the stream a fresh scalar head is drawn from.
HEAD_SEED_OFFSET = 0x5C0E


class ScalarHead(nn.Linear):
    """Hidden state (dim) -> one number, initialised inside the constructor (so ZeRO-3's partitioning,
    which runs when a module's constructor returns, sees the initialised tensor).

    Small init (std 1/sqrt(dim + 1)) so the first scores are O(1) whatever the hidden size. The draw
    comes from a generator of its own, seeded from the run's seed (``torch.manual_seed``), so a fresh
    head starts the same whatever the trunk before it drew from the global stream.
    """

    def __init__(self, dim: int):
        super().__init__(dim, 1, bias=True)
        generator = torch.Generator().manual_seed(torch.initial_seed() + HEAD_SEED_OFFSET)
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape, generator=generator) / (dim + 1) ** 0.5)
            self.bias.zero_()


class ScalarHeadModel(Decoder):
    """Decoder trunk -> (B, T) scalars. No LM head is built: the vocabulary-sized matrix would be memory
    (and, under ZeRO-3, a partitioned parameter) that no score reads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        if cfg.lora.rank > 0:  # the trunk trains through its adapters only; the head below trains in full
            freeze_base(self)
        self.score = ScalarHead(cfg.dim)

    def forward(self, input_ids: torch.Tensor, last_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scores (B, T) in fp32, or (B,) at ``last_index`` (one position per row) when given."""
        values = self.score(self.hidden_states(input_ids)).squeeze(-1).float()
        if last_index is None:
            return values
        return values.gather(1, last_index.long().unsqueeze(1)).squeeze(1)


def is_scalar_export(path: str | Path) -> bool:
    """Whether ``path`` is an llmsys export of a :class:`ScalarHeadModel` (a reward model or critic)."""
    cfg_file = Path(path) / CONFIG_NAME
    if not cfg_file.is_file():
        return False
    try:
        return json.loads(cfg_file.read_text()).get(HEAD_KEY) == SCALAR_HEAD
    except json.JSONDecodeError:
        return False


def fresh_head_param(name: str) -> bool:
    """Parameters that an LM export lacks and a scalar model initialises itself."""
    return name.startswith(SCORE_PREFIX)
