"""Generalised advantage estimation over token sequences (Schulman et al. 2016, eq. 11-16)."""
from __future__ import annotations

import torch


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
