"""The online-RL parts on hand-made tensors: score shaping, KL-shaped rewards, PPO's experience step, and
scoring in micro-batches with stand-in models."""
from __future__ import annotations

import contextlib

import pytest
import torch

from llmsys.models.generation import Generation
from llmsys.rlhf.advantages import gae
from llmsys.rlhf.rollout import (
    Sampling,
    ScoreShaping,
    build_rollout,
    kl_shaped_rewards,
    ppo_experience,
    score_rollout,
    shape_scores,
)
from llmsys.rlhf.stats import RunningMoments, masked_whiten


def two_rows():
    prompts = [[5, 6, 7], [8, 9]]
    tokens = torch.tensor([[11, 12, 13], [14, 0, 0]])
    lengths, finished = torch.tensor([3, 1]), torch.tensor([True, False])
    return prompts, Generation(tokens, lengths, finished), build_rollout(prompts, tokens, lengths, finished, 0)


def test_shape_scores_penalise_normalise_and_clip():
    scores, finished = torch.tensor([2.0, 4.0, -1.0]), torch.tensor([True, False, True])
    penalised = shape_scores(scores, finished, ScoreShaping(missing_eos_penalty=1.0, normalize=False), None)
    assert penalised.tolist() == [2.0, 3.0, -1.0]
    moments = RunningMoments()
    normalised = shape_scores(scores, finished, ScoreShaping(1.0, normalize=True, clip=1.0), moments)
    mean, std = 4.0 / 3, (((2 - 4 / 3) ** 2 + (3 - 4 / 3) ** 2 + (-1 - 4 / 3) ** 2) / 3) ** 0.5
    assert moments.mean == pytest.approx(mean) and moments.std == pytest.approx(std)
    expected = [max(-1.0, min(1.0, (v - mean) / std)) for v in (2.0, 3.0, -1.0)]
    assert normalised.tolist() == pytest.approx(expected, rel=1e-6)
    assert normalised.min().item() == -1.0  # (-1 - 4/3) / std = -1.37 is clipped; 0.98 is not


def test_kl_shaped_rewards_put_the_score_on_the_last_token():
    _, gen, rollout = two_rows()
    rollout.logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, 0.0, 0.0]])
    rollout.ref_logprobs = torch.tensor([[-1.5, -2.0, -1.0], [-0.5, 0.0, 0.0]])
    rewards = kl_shaped_rewards(torch.tensor([10.0, -3.0]), rollout, gen.lengths, kl_coef=0.1, estimator="k1")
    # k1 = logp - ref per token, masked; -0.1 * k1, then + score at index length - 1
    assert rewards.flatten().tolist() == pytest.approx([-0.05, 0.0, -0.05 + 10.0, 0.05 - 3.0, 0.0, 0.0])


def test_ppo_experience_is_gae_then_whitening_over_the_tokens():
    _, gen, rollout = two_rows()
    rollout.logprobs = torch.zeros(2, 3)
    rollout.ref_logprobs = torch.zeros(2, 3)
    rollout.values = torch.tensor([[0.5, 0.25, 1.0], [2.0, 0.0, 0.0]]) * rollout.mask
    rollout.scores = torch.tensor([1.0, 2.0])
    ppo_experience(gen, rollout, shaping=ScoreShaping(normalize=False), moments=RunningMoments(), kl_coef=0.1,
                   kl_estimator="k1", gamma=1.0, lam=0.9)
    rewards = torch.tensor([[0.0, 0.0, 1.0], [2.0, 0.0, 0.0]])
    advantages, returns = gae(rewards, rollout.values, rollout.mask, gamma=1.0, lam=0.9)
    torch.testing.assert_close(rollout.returns, returns)
    torch.testing.assert_close(rollout.advantages, masked_whiten(advantages, rollout.mask, unbiased=False) * rollout.mask)
    assert rollout.advantages[rollout.mask.bool()].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert rollout.advantages[1, 1:].tolist() == [0.0, 0.0]


class Stand_in:
    """A model that answers from the input ids, counting how many rows each call saw."""

    def __init__(self, kind: str):
        self.kind, self.calls = kind, []

    def evaluating(self):
        return contextlib.nullcontext()

    def __call__(self, input_ids, labels=None, logprobs_temperature=None, last_index=None):
        self.calls.append(input_ids.shape[0])
        x = input_ids.float()
        if self.kind == "policy":
            return -x / (10 * logprobs_temperature), torch.ones_like(x)
        if self.kind == "reward":
            return x.gather(1, last_index.unsqueeze(1)).squeeze(1)
        return x * 0.5  # critic: one value per position


def test_score_rollout_fills_every_field_in_micro_batches():
    _, _, rollout = two_rows()
    rows = torch.cat([rollout.input_ids] * 3)  # 6 rows, micro-batches of 4 and 2
    big = build_rollout([[5, 6, 7], [8, 9]] * 3, torch.tensor([[11, 12, 13], [14, 0, 0]] * 3),
                        torch.tensor([3, 1] * 3), torch.tensor([True, False] * 3), 0)
    assert torch.equal(big.input_ids, rows)
    policy, reference, reward, critic = (Stand_in(k) for k in ("policy", "policy", "reward", "critic"))
    score_rollout(big, policy=policy, reference=reference, reward_model=reward, critic=critic, micro_batch=4,
                  temperature=2.0)
    assert policy.calls == reference.calls == reward.calls == critic.calls == [4, 2]
    assert big.scores.tolist() == [13.0, 14.0] * 3  # the last response token's id
    assert big.logprobs[0].tolist() == pytest.approx([-7 / 20, -11 / 20, -12 / 20])  # read at the predicting positions
    assert big.values[1].tolist() == [0.5 * 9, 0.0, 0.0]  # V of the state before the response token
    assert torch.equal(big.logprobs, big.ref_logprobs)
    no_critic = build_rollout([[5, 6, 7]], torch.tensor([[11, 12, 13]]), torch.tensor([3]), torch.tensor([True]), 0)
    score_rollout(no_critic, policy=policy, reference=reference, reward_model=reward, critic=None, micro_batch=4,
                  temperature=1.0)
    assert no_critic.values is None and no_critic.scores.tolist() == [13.0]


def test_greedy_sampling_takes_log_probs_at_temperature_one():
    assert Sampling(8, temperature=0.0, top_p=1.0, end_of_turn=3, filler=0).logprob_temperature == 1.0
    assert Sampling(8, temperature=0.7, top_p=1.0, end_of_turn=3, filler=0).logprob_temperature == 0.7
