"""llmsys.rlhf.advantages: gae against a plain Python loop; the critic-free estimators against values worked out by hand."""
import math

import pytest
import torch

from llmsys.rlhf import (
    broadcast_to_tokens,
    gae,
    group_advantages,
    local_sum,
    reinforce_pp_advantages,
    rloo_advantages,
)


def _gae_reference(rewards, values, lengths, gamma, lam):
    B, T = len(rewards), len(rewards[0])
    advantages = [[0.0] * T for _ in range(B)]
    returns = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = lengths[b]
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            running = delta + gamma * lam * running
            advantages[b][t] = running
            returns[b][t] = running + values[b][t]
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_python_loop_on_ragged_rows(gamma, lam):
    torch.manual_seed(0)
    B, T = 5, 11
    lengths = [11, 7, 1, 3, 11]
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = _gae_reference(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    assert advantages.shape == returns.shape == (B, T)
    torch.testing.assert_close(advantages, torch.tensor(ref_adv), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(returns, torch.tensor(ref_ret), atol=1e-5, rtol=1e-5)
    assert torch.all(advantages[mask == 0] == 0) and torch.all(returns[mask == 0] == 0)


def test_gae_by_hand():
    # one row of 2 real tokens then padding (whose garbage rewards/values must not leak in).
    rewards = torch.tensor([[0.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.25, 9.0]])
    mask = torch.tensor([[1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    a1 = 1.0 - 0.25                     # delta_1 = r_1 + gamma * 0 - V_1
    a0 = (0.0 + 0.5 * 0.25 - 0.5) + 0.25 * a1
    assert advantages[0].tolist() == pytest.approx([a0, a1, 0.0])
    assert returns[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.25, 0.0])


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    advantages, returns = gae(rewards, values, torch.ones(1, 4), gamma=1.0, lam=1.0)
    assert returns[0].tolist() == pytest.approx([10.0, 9.0, 7.0, 4.0])
    assert advantages[0].tolist() == pytest.approx([9.9, 8.8, 6.7, 3.6])


# --- GRPO / Dr. GRPO / RLOO: two prompts of three samples each, rows grouped by prompt -----------------

GROUPED_REWARDS = torch.tensor([1.0, 2.0, 6.0, 0.5, 0.5, 2.0])


def test_group_advantages_by_hand_unbiased_std():
    # group 0: [1, 2, 6], mean 3, r - mean = [-2, -1, 3], unbiased var = (4 + 1 + 9) / 2 = 7
    # group 1: [0.5, 0.5, 2], mean 1, r - mean = [-0.5, -0.5, 1], unbiased var = (0.25 + 0.25 + 1) / 2 = 0.75
    eps = 1e-6
    s0, s1 = math.sqrt(7.0) + eps, math.sqrt(0.75) + eps
    expected = [-2 / s0, -1 / s0, 3 / s0, -0.5 / s1, -0.5 / s1, 1 / s1]
    assert group_advantages(GROUPED_REWARDS, 3).tolist() == pytest.approx(expected, rel=1e-6)


def test_group_advantages_without_std_is_dr_grpo():
    # Dr. GRPO keeps r - mean of the group: [-2, -1, 3] and [-0.5, -0.5, 1]
    assert group_advantages(GROUPED_REWARDS, 3, normalize_std=False).tolist() == pytest.approx(
        [-2.0, -1.0, 3.0, -0.5, -0.5, 1.0])


def test_group_advantages_equal_rewards_give_zero_not_nan():
    # group 1 is [4, 4]: std 0, (4 - 4) / (0 + eps) = 0; group 0 is [3, -1]: mean 1, unbiased std sqrt(8)
    advantages = group_advantages(torch.tensor([3.0, -1.0, 4.0, 4.0]), 2)
    s = math.sqrt(8.0) + 1e-6
    assert advantages.tolist() == pytest.approx([2 / s, -2 / s, 0.0, 0.0], rel=1e-6)


def test_group_advantages_carry_no_gradient():
    rewards = GROUPED_REWARDS.clone().requires_grad_()
    assert not group_advantages(rewards, 3).requires_grad and not rloo_advantages(rewards, 3).requires_grad


def test_rloo_advantages_by_hand():
    # group 0 [1, 2, 6]: 1 - (2 + 6) / 2 = -3; 2 - (1 + 6) / 2 = -1.5; 6 - (1 + 2) / 2 = 4.5
    # group 1 [0.5, 0.5, 2]: 0.5 - (0.5 + 2) / 2 = -0.75 (twice); 2 - (0.5 + 0.5) / 2 = 1.5
    assert rloo_advantages(GROUPED_REWARDS, 3).tolist() == pytest.approx([-3.0, -1.5, 4.5, -0.75, -0.75, 1.5])
    # pairs: [3, -1] -> [3 - (-1), -1 - 3] = [4, -4]; [0.5, 2.5] -> [-2, 2]
    assert rloo_advantages(torch.tensor([3.0, -1.0, 0.5, 2.5]), 2).tolist() == pytest.approx([4.0, -4.0, -2.0, 2.0])


@pytest.mark.parametrize("estimator", [group_advantages, rloo_advantages])
def test_group_estimators_reject_bad_group_sizes(estimator):
    with pytest.raises(ValueError, match="group_size >= 2"):
        estimator(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="not a multiple of group_size=2"):
        estimator(torch.tensor([1.0, 2.0, 3.0]), 2)
    with pytest.raises(ValueError, match="1-D"):
        estimator(torch.ones(2, 2), 2)


def test_group_advantages_without_std_also_rejects_group_size_one():
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.tensor([1.0, 2.0]), 1, normalize_std=False)


def test_broadcast_to_tokens_puts_the_sequence_value_on_its_unmasked_tokens():
    out = broadcast_to_tokens(torch.tensor([2.0, -3.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert out.tolist() == [[2.0, 2.0, 0.0], [-3.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match=r"values \(B,\) and mask \(B, T\)"):
        broadcast_to_tokens(torch.tensor([1.0]), torch.ones(2, 3))


# --- REINFORCE++ --------------------------------------------------------------------------------------

# shard A: row 0 has 3 tokens, row 1 has 2 (its third reward, 100, is padding and must not leak in)
SHARD_A_REWARDS = torch.tensor([[1.0, -2.0, 6.0], [2.0, 4.0, 100.0]])
SHARD_A_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
# returns-to-go with gamma = 0.5:
#   row 0: G_2 = 6, G_1 = -2 + 0.5 * 6 = 1, G_0 = 1 + 0.5 * 1 = 1.5
#   row 1: G_1 = 4, G_0 = 2 + 0.5 * 4 = 4
SHARD_A_RETURNS = [[1.5, 1.0, 6.0], [4.0, 4.0]]
# shard B (another rank): one row of 2 tokens: G_1 = 5, G_0 = -1 + 0.5 * 5 = 1.5
SHARD_B_REWARDS = torch.tensor([[-1.0, 5.0, 7.0]])
SHARD_B_MASK = torch.tensor([[1, 1, 0]])


def test_reinforce_pp_by_hand_one_process():
    # tokens [1.5, 1, 6, 4, 4]: sum 16.5, n 5, mean 3.3
    # G - mean = [-1.8, -2.3, 2.7, 0.7, 0.7]; squares 3.24 + 5.29 + 7.29 + 0.49 + 0.49 = 16.8; biased var 3.36
    advantages = reinforce_pp_advantages(SHARD_A_REWARDS, SHARD_A_MASK, gamma=0.5)
    std = math.sqrt(3.36 + 1e-8)
    assert advantages[0].tolist() == pytest.approx([-1.8 / std, -2.3 / std, 2.7 / std], rel=1e-5)
    assert advantages[1].tolist() == pytest.approx([0.7 / std, 0.7 / std, 0.0], rel=1e-5)
    assert advantages[1, 2].item() == 0.0


def test_reinforce_pp_gamma_one_is_the_plain_sum_to_go():
    # G = [[1 - 2 + 6, -2 + 6, 6], [2 + 4, 4]] = [[5, 4, 6], [6, 4]]: mean 5, G - mean = [0, -1, 1, 1, -1], var 4 / 5
    advantages = reinforce_pp_advantages(SHARD_A_REWARDS, SHARD_A_MASK)
    std = math.sqrt(0.8 + 1e-8)
    assert advantages.flatten().tolist() == pytest.approx([0.0, -1 / std, 1 / std, 1 / std, -1 / std, 0.0], abs=1e-6)


def test_reinforce_pp_normalises_over_every_shard():
    # joint tokens [1.5, 1, 6, 4, 4] + [1.5, 5]: sum 16.5 + 6.5 = 23, n 7, mean 23 / 7
    # sum of squares 71.25 + 27.25 = 98.5, biased var 98.5 / 7 - (23 / 7)^2 = (689.5 - 529) / 49 = 160.5 / 49
    mean, std = 23 / 7, math.sqrt(160.5 / 49 + 1e-8)
    shard_b_sums = torch.tensor([1.5 + 5.0, 1.5 ** 2 + 5.0 ** 2, 2.0], dtype=torch.float64)
    shard_a_sums = torch.tensor([16.5, 71.25, 5.0], dtype=torch.float64)
    adv_a = reinforce_pp_advantages(SHARD_A_REWARDS, SHARD_A_MASK, 0.5, reduce=lambda v: v + shard_b_sums)
    adv_b = reinforce_pp_advantages(SHARD_B_REWARDS, SHARD_B_MASK, 0.5, reduce=lambda v: v + shard_a_sums)
    assert adv_a[0].tolist() == pytest.approx([(g - mean) / std for g in SHARD_A_RETURNS[0]], rel=1e-5)
    assert adv_a[1].tolist() == pytest.approx([(g - mean) / std for g in SHARD_A_RETURNS[1]] + [0.0], rel=1e-5)
    assert adv_b[0].tolist() == pytest.approx([(1.5 - mean) / std, (5.0 - mean) / std, 0.0], rel=1e-5)
    # and the same as one process holding both shards
    joint = reinforce_pp_advantages(torch.cat([SHARD_A_REWARDS, SHARD_B_REWARDS]),
                                    torch.cat([SHARD_A_MASK, SHARD_B_MASK]), 0.5, reduce=local_sum)
    torch.testing.assert_close(torch.cat([adv_a, adv_b]), joint)
