"""RLHF losses as pure functions of tensors: reward model, DPO/IPO, policy (PPO, GRPO, DAPO, GSPO), value, KL.

Each takes per-example or per-token tensors and returns a scalar loss (plus diagnostics); nothing
here knows about models, engines or batches. Masks are ``(B, T)`` with 1 on the tokens that count
(the response), and token averages are over the unmasked tokens of the whole batch, so every token
weighs the same whatever the length of its row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmsys.rlhf.kl import kl_penalty
from llmsys.rlhf.stats import masked_whiten  # noqa: F401  (re-exported: one implementation, in stats)

DPO_LOSS_TYPES = ("sigmoid", "ipo")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
RATIO_LEVELS = ("token", "sequence")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1 (whole batch); 0 if nothing is unmasked."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def pairwise_reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry reward-model loss, ``mean(-log sigmoid(r_chosen - r_rejected))``.

    Ouyang et al. 2022 (InstructGPT), eq. 1; the probability that the chosen answer is preferred
    is modelled as ``sigmoid(r_c - r_r)``. Inputs ``(B,)``.
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimisation on summed response log-probs ``(B,)``; returns ``(loss, chosen, rejected)``.

    With ``h = (pi_c - ref_c) - (pi_r - ref_r)``, the log-ratio margin:

    - ``sigmoid``: Rafailov et al. 2023, eq. 7, ``-log sigmoid(beta h)``; with ``label_smoothing``
      ``eps`` > 0 the conservative DPO of Mitchell 2023 (labels flipped with probability ``eps``),
      ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
    - ``ipo``: Azar et al. 2023 ("A General Theoretical Paradigm...", eq. 17), ``(h - 1/(2 beta))^2``,
      which regresses the margin to a finite target instead of pushing it to infinity.

    ``loss`` is the batch mean. The implicit rewards ``beta (pi - ref)`` per example are detached,
    for logging (reward accuracy and margins).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = (-(1.0 - label_smoothing) * F.logsigmoid(beta * h)
                  - label_smoothing * F.logsigmoid(-beta * h))
    else:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses.mean(), chosen_rewards, rejected_rewards


def masked_agg(values: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean",
               max_len: int | None = None) -> torch.Tensor:
    """A per-token loss ``(B, T)`` to a scalar over the unmasked tokens, in one of the :data:`LOSS_AGGS` ways.

    - ``"token-mean"``: sum over every unmasked token of the batch / their number (:func:`masked_mean`;
      DAPO's token-level loss, Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at
      Scale": every token weighs the same, whatever the length of its row).
    - ``"seq-mean-token-mean"``: mean over sequences of each sequence's token mean (GRPO as published,
      ``1/G sum_i 1/|o_i| sum_t``, Shao et al. 2024, "DeepSeekMath").
    - ``"seq-mean-token-sum-norm"``: mean over sequences of (token sum / ``max_len``), a constant such as
      the generation budget (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
      Perspective": no length bias); ``max_len`` is required there.

    A sequence with no unmasked token is left out of the sequence means (as verl does), and a batch with
    none at all gives 0, never NaN. Masked entries must be finite (they are multiplied by 0).
    """
    if agg not in LOSS_AGGS:
        raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {', '.join(LOSS_AGGS)}")
    if agg == "token-mean":
        return masked_mean(values, mask)
    if values.dim() != 2 or mask.shape != values.shape:
        raise ValueError(f"{agg!r} aggregation needs values and mask of the same (B, T) shape; got "
                         f"{tuple(values.shape)} and {tuple(mask.shape)}")
    mask = mask.to(values.dtype)
    tokens = mask.sum(dim=-1)
    sums = (values * mask).sum(dim=-1)
    if agg == "seq-mean-token-mean":
        per_sequence = sums / tokens.clamp(min=1.0)
    else:
        if max_len is None or isinstance(max_len, bool) or not max_len > 0:
            raise ValueError(f"'seq-mean-token-sum-norm' aggregation needs max_len > 0 (a constant, e.g. the "
                             f"maximum response length); got max_len={max_len!r}")
        per_sequence = sums / max_len
    return per_sequence.sum() / (tokens > 0).to(values.dtype).sum().clamp(min=1.0)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    level: str = "token",
    max_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped policy-gradient surrogate of PPO/GRPO/DAPO/GSPO as a loss; all inputs ``(B, T)``; returns ``(loss, clipfrac)``.

    Per token ``max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high))`` (Schulman et al. 2017, eq. 7,
    negated), aggregated over the unmasked tokens by :func:`masked_agg` (``agg``, ``max_len``). A
    per-sequence advantage (GRPO, RLOO) is broadcast over its tokens by the caller
    (:func:`llmsys.rlhf.advantages.broadcast_to_tokens`). ``clip_high > clip_low`` is DAPO's clip-higher
    (Yu et al. 2025, e.g. 0.2 / 0.28: low-probability tokens with a positive advantage may grow further).

    ``level`` picks the importance ratio:

    - ``"token"``: ``rho_t = exp(logprobs_t - old_logprobs_t)``.
    - ``"sequence"``: GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"), one ratio per
      sequence, the length-normalised ``s_i = exp(mean over its unmasked tokens of (logprobs - old))``, in
      the GSPO-token form ``s_{i,t} = sg[s_i] pi(y_t) / sg[pi(y_t)]``: every token's value is ``s_i`` and
      its gradient ``s_i grad log pi(y_t)``. GSPO uses much smaller clip ranges than PPO (e.g. 3e-4 / 4e-4).

    ``clipfrac`` is the fraction of unmasked tokens where the clipped term is strictly larger (where the
    gradient is cut off), always a token mean, detached. Unknown ``agg``/``level`` raise ``ValueError``.
    """
    if level not in RATIO_LEVELS:
        raise ValueError(f"unknown importance-ratio level {level!r}; expected one of {', '.join(RATIO_LEVELS)}")
    if agg not in LOSS_AGGS:
        raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {', '.join(LOSS_AGGS)}")
    if level == "token":
        ratio = torch.exp(logprobs - old_logprobs)
    else:
        kept = mask.bool()
        log_ratio = torch.where(kept, logprobs.detach() - old_logprobs, torch.zeros_like(logprobs))
        seq_log_ratio = log_ratio.sum(dim=-1) / kept.sum(dim=-1).clamp(min=1).to(logprobs.dtype)
        ratio = torch.exp(seq_log_ratio[:, None] + (logprobs - logprobs.detach()))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = masked_agg(torch.maximum(unclipped, clipped), mask, agg, max_len)
    clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask).detach()
    return loss, clipfrac


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate, Schulman et al. 2017 eq. 7, as a loss; all inputs ``(B, T)``; returns ``(loss, clipfrac)``.

    Per token ``max(-A rho, -A clip(rho, 1 - eps, 1 + eps))`` with ``rho = exp(logprobs - old_logprobs)``
    (the negative of the pessimistic ``min`` of the paper), averaged over the unmasked tokens.
    ``clipfrac`` is the fraction of unmasked tokens where the clipped term is strictly larger,
    i.e. where the gradient is cut off. The symmetric, token-level, token-mean case of :func:`policy_loss`
    (same operations in the same order, so the same bits).
    """
    return policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=clip_eps, clip_high=clip_eps,
                       agg="token-mean", level="token")


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    estimator: str = "k3",
    agg: str = "token-mean",
    max_len: int | None = None,
) -> torch.Tensor:
    """KL(policy || reference) as a loss term, aggregated like the policy loss; inputs ``(B, T)``.

    GRPO (Shao et al. 2024, "DeepSeekMath", sec. 4.1) adds ``beta * D_KL`` to the loss instead of
    subtracting it from the reward, estimated per token with Schulman's unbiased, non-negative k3,
    ``pi_ref / pi - log(pi_ref / pi) - 1`` (:func:`llmsys.rlhf.kl.kl_penalty`); the trainer adds
    ``beta * kl_loss(...)`` with the ``agg`` (and ``max_len``) of its :func:`policy_loss`.
    """
    return masked_agg(kl_penalty(logprobs, ref_logprobs, estimator), mask, agg, max_len)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> torch.Tensor:
    """Clipped value loss, ``0.5 max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2)``, all ``(B, T)``.

    The value-clipping of the OpenAI baselines PPO2 implementation (discussed in Engstrom et al.
    2020, "Implementation Matters", sec. 3): the value head may not move more than ``eps`` from
    its rollout-time estimate without paying the larger of the two errors. Averaged over the
    unmasked tokens.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    losses = torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    return 0.5 * masked_mean(losses, mask)


def chosen_nll_loss(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Mean per-token negative log-likelihood of the chosen responses, ``-(1/B) sum_i logp_i / n_i``.

    Added to the DPO loss with a weight (``dpo.nll_weight``; Pang et al. 2024, "Iterative Reasoning
    Preference Optimization", eq. 3, TRL's ``rpo_alpha``): DPO alone may lower the likelihood of the
    chosen responses too, as long as the rejected ones fall faster, and drift a small model out of
    the data's distribution; the NLL term anchors it to the chosen answers.
    """
    return -(chosen_logps / chosen_tokens.clamp(min=1)).mean()

