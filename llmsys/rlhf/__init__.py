"""RL for language models, as parts: pure losses (reward model, DPO/IPO, PPO), advantages (GAE), KL
estimators and controllers, batch statistics with a pluggable reduction (``stats``), the online-RL
experience step (``rollout``: generate, score, shape rewards, advantages) and rule-based rewards
(``rewards``: the annotator that ranks ``data=prefs`` and scores answers). Nothing here talks to
DeepSpeed or torch.distributed; trainers pass in the reduction and the models."""
from llmsys.rlhf.advantages import gae
from llmsys.rlhf.kl import AdaptiveKLController, FixedKLController, kl_penalty
from llmsys.rlhf.losses import (
    dpo_loss,
    masked_mean,
    pairwise_reward_loss,
    ppo_policy_loss,
    ppo_value_loss,
)
from llmsys.rlhf.rewards import ANNOTATOR_NAME, RuleAnnotator, content_words, words
from llmsys.rlhf.rollout import (
    Rollout,
    Sampling,
    ScoreShaping,
    build_rollout,
    generate_rollout,
    kl_shaped_rewards,
    ppo_experience,
    score_rollout,
    shape_scores,
)
from llmsys.rlhf.stats import RunningMoments, local_sum, masked_moments, masked_whiten
from llmsys.rlhf.advantages import (
    broadcast_to_tokens,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from llmsys.rlhf.losses import LOSS_AGGS, RATIO_LEVELS, kl_loss, masked_agg, policy_loss

__all__ = [
    "ANNOTATOR_NAME",
    "AdaptiveKLController",
    "FixedKLController",
    "Rollout",
    "RuleAnnotator",
    "RunningMoments",
    "Sampling",
    "ScoreShaping",
    "build_rollout",
    "content_words",
    "dpo_loss",
    "gae",
    "generate_rollout",
    "kl_penalty",
    "kl_shaped_rewards",
    "local_sum",
    "masked_mean",
    "masked_moments",
    "masked_whiten",
    "pairwise_reward_loss",
    "ppo_experience",
    "ppo_policy_loss",
    "ppo_value_loss",
    "score_rollout",
    "shape_scores",
    "words",
    "LOSS_AGGS",
    "RATIO_LEVELS",
    "broadcast_to_tokens",
    "group_advantages",
    "kl_loss",
    "masked_agg",
    "policy_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
]
