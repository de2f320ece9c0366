"""RLHF math: reward-model, DPO and PPO losses, GAE, KL estimators and controllers (pure functions)."""
from llmsys.rlhf.advantages import gae
from llmsys.rlhf.kl import AdaptiveKLController, FixedKLController, kl_penalty
from llmsys.rlhf.losses import (
    dpo_loss,
    masked_mean,
    masked_whiten,
    pairwise_reward_loss,
    ppo_policy_loss,
    ppo_value_loss,
)

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "dpo_loss",
    "gae",
    "kl_penalty",
    "masked_mean",
    "masked_whiten",
    "pairwise_reward_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
]
