"""Stage 3a: a reward model learned from ranked pairs (InstructGPT, Ouyang et al. 2022, sec. 3.5).

The SFT model with its LM head replaced by a scalar head (:class:`~llmsys.models.heads.ScalarHeadModel`)
scores ``prompt + response`` at the response's last token. Each micro-batch runs its chosen and
rejected rows in one forward pass, and the Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)``
(:func:`llmsys.rlhf.losses.pairwise_reward_loss`) pushes the chosen score above the rejected one.
Metrics: ``accuracy`` (chosen scored higher), ``margin``; evaluation lines carry ``val_accuracy``.
The loop is the shared one in :mod:`llmsys.trainers.lm`; the export (``final/``) is marked
``"head": "scalar"`` and is what ``stage=ppo`` takes as ``ppo.reward_model``.
"""
from __future__ import annotations

import torch

from llmsys.config import Config
from llmsys.data.preference import collate_pairs
from llmsys.distributed import DistInfo, Engine
from llmsys.models.heads import HEAD_KEY, SCALAR_HEAD, ScalarHeadModel, fresh_head_param
from llmsys.rlhf.losses import pairwise_reward_loss
from llmsys.trainers.components import preference_pairs
from llmsys.trainers.lm import Batch, LMData, train_lm


def reward_loss(engine: Engine, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    rewards = engine(batch["input_ids"], last_index=batch["last_index"])
    half = rewards.shape[0] // 2
    chosen, rejected = rewards[:half], rewards[half:]
    loss = pairwise_reward_loss(chosen, rejected)
    return loss, {"accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).mean(),
                  "chosen_reward": chosen.mean(), "rejected_reward": rejected.mean()}


def run(cfg: Config, dist: DistInfo) -> dict:
    cache_dir, data = preference_pairs(cfg, dist)
    pad = data.tokenizer.pad_id
    return train_lm(cfg, dist, LMData(
        train_size=len(data.train), collate_train=lambda idx: collate_pairs([data.train.pair(i) for i in idx], pad),
        val_size=len(data.val), collate_val=lambda idx: collate_pairs([data.val.pair(i) for i in idx], pad),
        tokenizer_dir=cache_dir / "tokenizer", tokenizer_vocab=data.tokenizer.vocab_size, cache_dir=cache_dir,
        max_tokens_per_sample=cfg.data.seq_len, model_class=ScalarHeadModel, compute_loss=reward_loss,
        fresh_param=fresh_head_param, export_extra={HEAD_KEY: SCALAR_HEAD}))
