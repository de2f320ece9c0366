"""llmsys.rlhf.advantages.gae against a plain Python loop."""
import pytest
import torch

from llmsys.rlhf import gae


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
