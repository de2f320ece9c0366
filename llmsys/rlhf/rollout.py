"""Online RL experience, as parts: generate -> score -> shape rewards -> advantages.

A second online algorithm (GRPO, RLOO, REINFORCE++) reuses the same parts and changes only what
differs (no critic, group-relative advantages, another reward):

- :func:`generate_rollout`: responses for a batch of prompts from the policy (KV cache), as a
  :class:`Rollout` of right-padded ``prompt + response`` rows;
- :func:`score_rollout`: per-token log-probs of the policy and the reference, critic values, and the
  reward model's score at each response's last token, in micro-batches without gradients;
- :func:`shape_scores` and :func:`kl_shaped_rewards`: the scalar score made comparable across
  iterations (missing-EOS penalty, running normalisation, clipping), then the per-token reward
  ``-beta * KL_t`` with the score added at the last token (Ziegler et al. 2019, eq. 2);
- :func:`ppo_experience`: the four above plus GAE and advantage whitening over all ranks, which is
  PPO's experience step.

The models are duck-typed: a *trainable* model (``llmsys.distributed.Engine``) is callable and has
``.module`` and ``.evaluating()``; a *frozen* one (``FrozenModel``) is callable. Nothing here talks to
torch.distributed: a ``reduce`` function (see :mod:`llmsys.rlhf.stats`) sums over ranks, and
``all_finished`` decides when lock-step generation may stop.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from llmsys.models.generation import Generation, generate
from llmsys.rlhf.advantages import gae
from llmsys.rlhf.kl import kl_penalty
from llmsys.rlhf.stats import Reduce, RunningMoments, local_sum, masked_whiten


@dataclass
class Rollout:
    """A batch of prompt + response sequences, right-padded, and what the algorithm computed for them.

    Response token ``r`` of row ``b`` is predicted at position ``positions[b, r]`` of ``input_ids``
    (the position before it); per-token tensors are ``(B, R)`` with ``mask`` 1 on real tokens.
    """

    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T) the response tokens at their predicting positions, else -100
    positions: torch.Tensor  # (B, R)
    mask: torch.Tensor  # (B, R) float
    last_index: torch.Tensor  # (B,) position of the last response token
    finished: torch.Tensor  # (B,) bool, ended with the end-of-turn token
    logprobs: Optional[torch.Tensor] = None  # (B, R) policy, at generation time
    ref_logprobs: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None  # (B,) raw reward-model scores
    sampler_logprobs: Optional[torch.Tensor] = None  # (B, R) what the decode path computed while sampling
    advantages: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> "Rollout":
        return Rollout(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                          for f in dataclasses.fields(self)})


def build_rollout(prompts: Sequence[Sequence[int]], tokens: torch.Tensor, lengths: torch.Tensor,
                  finished: torch.Tensor, filler: int) -> Rollout:
    """Concatenate each prompt with its generated tokens (``lengths[b]`` of row b of ``tokens``)."""
    B, R = tokens.shape
    device = tokens.device
    prompt_lens = torch.tensor([len(p) for p in prompts], device=device)
    total = prompt_lens + lengths
    input_ids = torch.full((B, int(total.max())), filler, dtype=torch.long, device=device)
    labels = torch.full_like(input_ids, -100)
    r = torch.arange(R, device=device)
    mask = (r[None, :] < lengths[:, None])
    positions = (prompt_lens[:, None] - 1 + r[None, :]).clamp(max=input_ids.shape[1] - 1)
    for b, prompt in enumerate(prompts):
        n, p = int(lengths[b]), len(prompt)
        input_ids[b, :p] = torch.as_tensor(prompt, device=device)
        input_ids[b, p:p + n] = tokens[b, :n]
        labels[b, p - 1:p - 1 + n] = tokens[b, :n]
    return Rollout(input_ids, labels, positions, mask.float(), total - 1, finished)


def _at_response(per_position: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    return per_position.gather(1, rollout.positions) * rollout.mask


def policy_logprobs(model: Callable, rollout: Rollout, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R) log-probs and entropies of the response tokens under ``model`` (an engine or frozen model)."""
    logp, entropy = model(rollout.input_ids, labels=rollout.labels, logprobs_temperature=temperature)
    return _at_response(logp, rollout), _at_response(entropy, rollout)


def critic_values(model: Callable, rollout: Rollout) -> torch.Tensor:
    """(B, R): V of the state before each response token."""
    return _at_response(model(rollout.input_ids), rollout)


@dataclass(frozen=True)
class Sampling:
    """How responses are drawn (``ppo.temperature``, ``ppo.top_p``, ``ppo.max_new_tokens``)."""

    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    end_of_turn: int  # generation stops at this id
    filler: int  # the pad id of the rows

    @property
    def logprob_temperature(self) -> float:
        """Log-probs are taken at the sampling temperature (greedy: 1)."""
        return self.temperature if self.temperature > 0 else 1.0


def generate_rollout(policy: Any, prompts: Sequence[Sequence[int]], sampling: Sampling, generator: torch.Generator,
                     all_finished: Optional[Callable[[torch.Tensor], bool]] = None,
                     record_logprobs: bool = False) -> tuple[Generation, Rollout]:
    """Sample a response per prompt from the trainable ``policy`` (eval mode, KV cache). With
    ``record_logprobs`` the rollout keeps the decode path's log-probs of the drawn tokens
    (``sampler_logprobs``), to compare with the training forward's (:func:`logprob_mismatch`)."""
    with policy.evaluating():
        gen = generate(policy.module, prompts, sampling.max_new_tokens, temperature=sampling.temperature,
                       top_p=sampling.top_p, eos_id=sampling.end_of_turn, pad_id=sampling.filler,
                       generator=generator, all_finished=all_finished,
                       logprobs_temperature=sampling.logprob_temperature if record_logprobs else None)
    rollout = build_rollout(prompts, gen.tokens, gen.lengths, gen.finished, sampling.filler)
    if record_logprobs:
        rollout.sampler_logprobs = gen.logprobs * rollout.mask
    return gen, rollout


def decode_responses(tokenizer: Any, gen: Generation) -> list[str]:
    """The generated responses as text (``tokenizer.decode``), without their end-of-turn token."""
    return [tokenizer.decode(gen.tokens[b, :int(gen.lengths[b]) - int(gen.finished[b])].tolist())
            for b in range(gen.tokens.shape[0])]


def score_rollout(rollout: Rollout, *, policy: Any, reference: Optional[Callable], reward_model: Optional[Callable],
                  critic: Optional[Any], micro_batch: int, temperature: float) -> Rollout:
    """Fill ``logprobs``, and ``ref_logprobs``, ``scores``, ``values`` for the models given (a reference,
    a reward model, a critic), computed ``micro_batch`` rows at a time without gradients. Every rank must
    call it with as many rows."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("logprobs", "ref_logprobs", "values", "scores")}
    with policy.evaluating(), critic.evaluating() if critic is not None else contextlib.nullcontext():
        for start in range(0, len(rollout), micro_batch):
            part = rollout.select(torch.arange(start, min(start + micro_batch, len(rollout)),
                                               device=rollout.input_ids.device))
            parts["logprobs"].append(policy_logprobs(policy, part, temperature)[0])
            if reference is not None:
                parts["ref_logprobs"].append(policy_logprobs(reference, part, temperature)[0])
            if critic is not None:
                parts["values"].append(critic_values(critic, part))
            if reward_model is not None:
                parts["scores"].append(reward_model(part.input_ids, last_index=part.last_index))
    for key, chunks in parts.items():
        if chunks:
            setattr(rollout, key, torch.cat([c.float() for c in chunks]))
    return rollout


@dataclass(frozen=True)
class ScoreShaping:
    """What happens to a reward-model score before it becomes a reward (``ppo.*`` of the same names)."""

    missing_eos_penalty: float = 0.0
    normalize: bool = True  # whiten with the running statistics of every score seen so far
    clip: float = 0.0  # clip to [-clip, clip]; 0 = off


def shape_scores(scores: torch.Tensor, finished: torch.Tensor, shaping: ScoreShaping,
                 moments: Optional[RunningMoments]) -> torch.Tensor:
    """(B,) scores minus the penalty for an unfinished response, normalised (updating ``moments``), clipped."""
    scores = scores - shaping.missing_eos_penalty * (~finished).float()
    if shaping.normalize:
        moments.update(scores)
        scores = (scores - moments.mean) / moments.std
    if shaping.clip:
        scores = scores.clamp(-shaping.clip, shaping.clip)
    return scores


def kl_shaped_rewards(scores: torch.Tensor, rollout: Rollout, lengths: torch.Tensor, kl_coef: float,
                      estimator: str) -> torch.Tensor:
    """(B, R) per-token rewards ``-kl_coef * KL_t`` with each row's score added at its last token."""
    kl_tokens = kl_penalty(rollout.logprobs, rollout.ref_logprobs, estimator) * rollout.mask
    rewards = -kl_coef * kl_tokens
    rows = torch.arange(len(rollout), device=rewards.device)
    rewards[rows, lengths.long() - 1] += scores
    return rewards


def score_at_last_token(scores: torch.Tensor, rollout: Rollout, lengths: torch.Tensor) -> torch.Tensor:
    """(B, R) per-token rewards that are 0 but for each row's score at its last token (no KL shaping)."""
    rewards = torch.zeros_like(rollout.mask)
    rewards[torch.arange(len(rollout), device=rewards.device), lengths.long() - 1] = scores.to(rewards.dtype)
    return rewards


def ppo_experience(gen: Generation, rollout: Rollout, *, shaping: ScoreShaping, moments: RunningMoments,
                   kl_coef: float, kl_estimator: str, gamma: float, lam: float,
                   reduce: Reduce = local_sum) -> Rollout:
    """PPO's advantages on a scored rollout: shaped rewards, GAE (gamma, lambda), advantages whitened over
    every rank's response tokens; ``returns`` = advantages + values before whitening."""
    scores = shape_scores(rollout.scores, rollout.finished, shaping, moments)
    rewards = kl_shaped_rewards(scores, rollout, gen.lengths, kl_coef, kl_estimator)
    advantages, rollout.returns = gae(rewards, rollout.values, rollout.mask, gamma=gamma, lam=lam)
    rollout.advantages = masked_whiten(advantages, rollout.mask, unbiased=False, reduce=reduce) * rollout.mask
    return rollout


def logprob_mismatch(rollout: Rollout, reduce: Reduce = local_sum,
                     reduce_max: Callable[[torch.Tensor], torch.Tensor] = local_sum) -> dict[str, float]:
    """How far the decode path's log-probs of the sampled tokens (``sampler_logprobs``) are from the training
    forward's (``logprobs``), over every rank's response tokens: the mean and the max of ``|difference|``.

    The two compute the same distribution along different code paths (KV-cache decode vs a full forward,
    possibly other kernels or precisions); when they disagree the "on-policy" update is silently
    off-policy, the failure the peers' issue trackers report most. ~1e-6 in fp32 with shared arithmetic.
    """
    diff = (rollout.sampler_logprobs - rollout.logprobs).abs() * rollout.mask
    total, count = reduce(torch.stack([diff.sum(), rollout.mask.sum()]).double()).tolist()
    worst = reduce_max(diff.max().double().reshape(1))
    return {"logprob_diff_mean": total / max(count, 1.0), "logprob_diff_max": float(worst[0])}


def truncated_is_weights(rollout: Rollout, cap: float) -> torch.Tensor:
    """(B, R) truncated importance weights ``min(p_train / p_decode, cap)`` of the sampled tokens (Yao et al.
    2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"): the rollout was drawn
    by the decode path, the loss assumes the training path; each token's policy gradient is reweighted."""
    return torch.exp(rollout.logprobs - rollout.sampler_logprobs).clamp(max=cap) * rollout.mask


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """(B,) DAPO's soft over-length punishment (Yu et al. 2025, eq. 13): 0 up to ``max_new_tokens - buffer``
    tokens, then growing linearly to ``penalty`` at ``max_new_tokens``; subtract it from the score."""
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
    excess = (lengths.float() - (max_new_tokens - buffer)).clamp(min=0.0) / buffer
    return penalty * excess.clamp(max=1.0)


def uniform_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) bool: rows whose group (``group_size`` consecutive rows) scored all the same. Their group-relative
    advantages are 0 and carry no signal; DAPO's dynamic sampling leaves them out (Yu et al. 2025, sec. 3.2)."""
    groups = scores.reshape(-1, group_size)
    same = (groups == groups[:, :1]).all(dim=1)
    return same.repeat_interleave(group_size)
