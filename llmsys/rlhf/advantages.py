"""Advantage estimators as pure functions of tensors.

GAE over token sequences with a critic (PPO); critic-free estimators from the rewards of several samples
of each prompt (GRPO, Dr. GRPO, RLOO) or from the batch (REINFORCE++). Each cites its paper.
"""
from __future__ import annotations

import torch

from llmsys.rlhf.stats import Reduce, local_sum, masked_whiten


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns of ``(B, T)`` per-token rewards and value estimates; returns ``(A, R)``, ``(B, T)``.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` (eq. 11) and ``A_t = delta_t + gamma lam A_{t+1}``
    (eq. 16, as a backward recursion). ``mask`` is a prefix of ones per row (the response, ragged
    lengths allowed); past the end of a row the episode is over, so the value after its last real
    token counts as 0 and the advantage there is 0. ``R = A + V`` on real tokens, 0 elsewhere.
    Computed without gradients (advantages and returns are PPO targets).
    """
    with torch.no_grad():
        mask = mask.to(values.dtype)
        rewards = rewards * mask
        values = values * mask  # also makes V_{t+1} = 0 just after a row's last real token
        advantages = torch.zeros_like(values)
        next_value = torch.zeros_like(values[:, 0])
        next_advantage = torch.zeros_like(values[:, 0])
        for t in reversed(range(values.shape[1])):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
            advantages[:, t] = next_advantage
            next_value = values[:, t]
        returns = (advantages + values) * mask
    return advantages, returns


def _groups(rewards: torch.Tensor, group_size: int, name: str) -> torch.Tensor:
    """``rewards`` ``(B,)`` as ``(B / group_size, group_size)``, one row per prompt; clear errors otherwise."""
    if rewards.dim() != 1:
        raise ValueError(f"{name}: rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"{name} needs group_size >= 2 (a baseline from the other samples of the same prompt); "
                         f"got group_size={group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{name}: batch of {rewards.numel()} rewards is not a multiple of group_size={group_size} "
                         "(each run of group_size consecutive rows must hold the samples of one prompt)")
    return rewards.view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages of GRPO, ``(B,)`` from the ``(B,)`` scalar rewards of ``B / group_size`` prompts.

    Shao et al. 2024 ("DeepSeekMath", sec. 4.1, GRPO with outcome supervision): ``A_i = (r_i - mean(r)) / std(r)``
    over the ``group_size`` samples of one prompt, with the unbiased (Bessel, n - 1) std and ``eps`` added
    to it, as TRL and verl compute it. ``normalize_std=False`` keeps ``r_i - mean(r)``: Dr. GRPO (Liu et al.
    2025, "Understanding R1-Zero-Like Training: A Critical Perspective"), which drops the std
    because it over-weights prompts that are nearly always (or never) solved.

    Rows are ordered so that each run of ``group_size`` consecutive rows holds the samples of one prompt.
    ``group_size < 2`` raises ``ValueError`` (the std of one sample is undefined and its own mean would
    leave it a zero advantage: nothing to learn), as does a batch that is not a multiple of ``group_size``.
    A group of equal rewards gets advantage 0. Computed without gradients.
    """
    with torch.no_grad():
        grouped = _groups(rewards, group_size, "group_advantages")
        centred = grouped - grouped.mean(dim=1, keepdim=True)
        if normalize_std:
            centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
        return centred.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out advantages, ``(B,)``: ``A_i = r_i - (1 / (k - 1)) sum_{j != i} r_j`` in each group.

    Ahmadian et al. 2024 ("Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs"): each of the ``k = group_size`` samples of a prompt is baselined by
    the mean reward of the other ``k - 1``. Same row order as :func:`group_advantages`; ``group_size < 2``
    (no other sample) or a batch not a multiple of ``group_size`` raises ``ValueError``. No gradients.
    """
    with torch.no_grad():
        grouped = _groups(rewards, group_size, "rloo_advantages")
        others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
        return (grouped - others).reshape(-1)


def broadcast_to_tokens(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A per-sequence value ``(B,)`` (e.g. a GRPO/RLOO advantage) on every unmasked token, ``(B, T)``; 0 elsewhere."""
    if values.dim() != 1 or mask.dim() != 2 or values.shape[0] != mask.shape[0]:
        raise ValueError(f"broadcast_to_tokens needs values (B,) and mask (B, T); got {tuple(values.shape)} "
                         f"and {tuple(mask.shape)}")
    return values[:, None] * mask.to(values.dtype)


def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                            reduce: Reduce = local_sum) -> torch.Tensor:
    """REINFORCE++ advantages, ``(B, T)``: discounted returns-to-go normalised over the global batch's tokens.

    Hu 2025 ("REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models"):
    with per-token rewards ``r_t`` (the caller's: the score at the last token minus the per-token KL
    penalty, as :func:`llmsys.rlhf.rollout.kl_shaped_rewards` builds them), ``G_t = sum_{s >= t} gamma^(s-t)
    r_s`` over the unmasked tokens of the row, then ``A = (G - mean) / std`` with the mean and the plain
    (biased) variance over the unmasked tokens of the whole global batch: ``reduce`` sums the statistics
    over every rank (:func:`llmsys.rlhf.stats.masked_whiten`). No critic: the batch is the baseline.

    Rewards on masked tokens are ignored (``gamma`` still counts positions, so a hole in the mask is a
    step without reward); masked entries come back 0. Computed without gradients.
    """
    with torch.no_grad():
        mask = mask.to(token_rewards.dtype)
        rewards = token_rewards * mask
        returns = torch.zeros_like(rewards)
        running = torch.zeros_like(rewards[:, 0])
        for t in reversed(range(rewards.shape[1])):
            running = rewards[:, t] + gamma * running
            returns[:, t] = running
        returns = returns * mask
        return masked_whiten(returns, mask, unbiased=False, reduce=reduce) * mask
