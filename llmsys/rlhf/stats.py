"""Batch statistics of online RL with a pluggable reduction: masked moments, whitening, running moments.

Online RL normalises over the whole batch, which under data parallelism is spread over ranks. Every
function here takes ``reduce``: a function that sums a float64 vector over the processes sharing the
batch (``llmsys.distributed.all_reduce_sum`` in a trainer; :func:`local_sum`, the default, on one
process). The math is one implementation whatever the world size: the sums of x, x^2 and the count are
reduced together, then mean and variance follow from them.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def local_sum(values: torch.Tensor) -> torch.Tensor:
    """The reduction of a single process: the values themselves."""
    return values


def masked_moments(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = local_sum) -> tuple[float, float, float]:
    """``(mean, biased variance, count)`` of the entries of ``x`` where ``mask`` is 1, over every process.

    The sums are taken in ``x``'s dtype, then reduced in float64.
    """
    mask = mask.to(x.dtype)
    total, total_sq, count = reduce(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()).tolist()
    mean = total / max(count, 1.0)
    return mean, max(total_sq / max(count, 1.0) - mean ** 2, 0.0), count


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, *, unbiased: bool = True,
                  reduce: Reduce = local_sum) -> torch.Tensor:
    """``(x - mean) / std`` with mean and variance over the unmasked entries of the whole batch.

    ``unbiased`` uses Bessel's correction (n - 1); PPO's advantage whitening uses the plain (biased)
    variance over every rank's tokens. With ``shift_mean=False`` the mean is added back, so only the
    scale changes (as for PPO rewards, whose sign carries meaning). Masked entries come back as
    computed, not zeroed.
    """
    mean, var, count = masked_moments(x, mask, reduce)
    if unbiased:
        var = var * count / max(count - 1.0, 1.0)
    whitened = (x - mean) * torch.rsqrt(torch.tensor(var + 1e-8, device=x.device))
    return whitened if shift_mean else whitened + mean


class RunningMoments:
    """Mean and variance of every value seen so far, over all processes (Chan et al. 1979's parallel update).

    PPO normalises reward-model scores with it, so the reward scale stays fixed while the policy moves.
    """

    def __init__(self, reduce: Reduce = local_sum) -> None:
        self.reduce = reduce
        self.count, self.mean, self.var = 0.0, 0.0, 1.0

    def update(self, values: torch.Tensor) -> None:
        values = values.double()
        batch_mean, batch_var, n = masked_moments(values, torch.ones_like(values), self.reduce)
        delta, new_count = batch_mean - self.mean, self.count + n
        m2 = self.var * self.count + batch_var * n + delta ** 2 * self.count * n / new_count
        self.mean += delta * n / new_count
        self.var, self.count = m2 / new_count, new_count

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.var > 0 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.var = state["count"], state["mean"], state["var"]
