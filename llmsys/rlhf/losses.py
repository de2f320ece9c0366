"""RLHF losses as pure functions of tensors: reward model, DPO/IPO, PPO policy and value.

Each takes per-example or per-token tensors and returns a scalar loss (plus diagnostics); nothing
here knows about models, engines or batches. Masks are ``(B, T)`` with 1 on the tokens that count
(the response), and token averages are over the unmasked tokens of the whole batch, so every token
weighs the same whatever the length of its row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmsys.rlhf.stats import masked_whiten  # noqa: F401  (re-exported: one implementation, in stats)

DPO_LOSS_TYPES = ("sigmoid", "ipo")


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
    i.e. where the gradient is cut off.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask).detach()
    return loss, clipfrac


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

