"""llmsys.rlhf.losses against values worked out by hand."""
import math

import pytest
import torch

from llmsys.rlhf import (
    dpo_loss,
    masked_mean,
    masked_whiten,
    pairwise_reward_loss,
    ppo_policy_loss,
    ppo_value_loss,
)


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_masked_mean_counts_only_unmasked_tokens_of_the_whole_batch():
    x = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx((1 + 2 + 10) / 3)


def test_masked_whiten_uses_unmasked_statistics():
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    kept = [1.0, 3.0, 5.0]
    mean = sum(kept) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in kept) / 2)  # unbiased
    whitened = masked_whiten(x, mask)
    expected = [(v - mean) / std for v in kept]
    assert whitened[mask.bool()].tolist() == pytest.approx(expected, abs=1e-5)
    unshifted = masked_whiten(x, mask, shift_mean=False)
    assert unshifted[mask.bool()].tolist() == pytest.approx([e + mean for e in expected], abs=1e-5)


def test_pairwise_reward_loss_is_bradley_terry():
    chosen = torch.tensor([2.0, 0.5, -1.0], requires_grad=True)
    rejected = torch.tensor([1.0, 1.5, -3.0])
    loss = pairwise_reward_loss(chosen, rejected)
    expected = -(_logsigmoid(1.0) + _logsigmoid(-1.0) + _logsigmoid(2.0)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/dr_c of -log sigmoid(d) / B = -(1 - sigmoid(d)) / B
    sig = [1 / (1 + math.exp(-d)) for d in (1.0, -1.0, 2.0)]
    assert chosen.grad.tolist() == pytest.approx([-(1 - s) / 3 for s in sig], rel=1e-5)


def test_pairwise_reward_loss_equal_rewards_is_log2():
    r = torch.randn(7)
    assert pairwise_reward_loss(r, r).item() == pytest.approx(math.log(2), rel=1e-6)


def test_dpo_policy_equal_to_reference_gives_log2_and_zero_rewards():
    chosen, rejected = torch.randn(5) * 10, torch.randn(5) * 10
    loss, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone())
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert torch.all(chosen_rewards == 0) and torch.all(rejected_rewards == 0)


def test_dpo_sigmoid_by_hand_with_label_smoothing():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    beta, eps = 0.5, 0.1
    # h = (pc - rc) - (pr - rr): example 0: 1 - (-1) = 2; example 1: 1 - 2 = -1
    hs = [2.0, -1.0]
    loss, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert loss.item() == pytest.approx(sum(-_logsigmoid(beta * h) for h in hs) / 2, rel=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([0.5, 0.5])
    assert rejected_rewards.tolist() == pytest.approx([-0.5, 1.0])
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    expected = sum(-(1 - eps) * _logsigmoid(beta * h) - eps * _logsigmoid(-beta * h) for h in hs) / 2
    assert smoothed.item() == pytest.approx(expected, rel=1e-6)


def test_dpo_ipo_by_hand():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    beta = 0.25  # target margin 1 / (2 beta) = 2
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    assert loss.item() == pytest.approx(((2.0 - 2.0) ** 2 + (-1.0 - 2.0) ** 2) / 2)


def test_dpo_unknown_loss_type():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="hinge"):
        dpo_loss(x, x, x, x, loss_type="hinge")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_gradient_step_increases_the_margin(loss_type):
    torch.manual_seed(0)
    chosen = torch.randn(6, requires_grad=True)
    rejected = torch.randn(6, requires_grad=True)
    ref_chosen, ref_rejected = torch.randn(6), torch.randn(6)
    loss, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1,
                                                      loss_type=loss_type)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    loss.backward()
    assert torch.all(chosen.grad < 0) and torch.all(rejected.grad > 0)
    margin_before = (chosen - rejected).detach()
    with torch.no_grad():
        chosen -= 0.1 * chosen.grad
        rejected -= 0.1 * rejected.grad
    assert torch.all(chosen - rejected > margin_before)


def test_ppo_policy_loss_by_hand_with_ragged_mask():
    # row 0: rho = e^{0.5} > 1.2 with A = +1 (clip active), rho = 1 with A = -2 (inactive)
    # row 1: rho = e^{-0.5} < 0.8 with A = -1 (clip active), then a masked token
    logprobs = torch.tensor([[0.5, 0.0], [-0.5, 3.0]], requires_grad=True)
    old = torch.zeros(2, 2)
    advantages = torch.tensor([[1.0, -2.0], [-1.0, 5.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, clipfrac = ppo_policy_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    per_token = [
        max(-1 * math.exp(0.5), -1 * 1.2),   # = -1.2, clipped larger
        max(2 * 1.0, 2 * 1.0),               # = 2, tie, not clipped
        max(1 * math.exp(-0.5), 1 * 0.8),    # = 0.8, clipped larger
    ]
    assert loss.item() == pytest.approx(sum(per_token) / 3, rel=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 3)
    loss.backward()
    # clipped tokens and the masked token get no gradient; token (0, 1): d(-A rho)/dlogp / 3 = 2 / 3
    assert logprobs.grad.flatten().tolist() == pytest.approx([0.0, 2 / 3, 0.0, 0.0], abs=1e-6)


def test_ppo_policy_loss_inactive_clip_is_the_plain_surrogate():
    torch.manual_seed(1)
    logprobs = torch.randn(3, 5, requires_grad=True)
    old = logprobs.detach() + 0.01 * torch.randn(3, 5)
    advantages = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    loss, clipfrac = ppo_policy_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    ratio = torch.exp(logprobs.detach() - old)
    expected = sum((-advantages * ratio)[i, j].item() for i in range(3) for j in range(5) if mask[i, j]) / 8
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert clipfrac.item() == 0.0
    loss.backward()
    assert torch.all(logprobs.grad[mask == 0] == 0) and torch.all(logprobs.grad[mask == 1] != 0)


def test_ppo_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.5], [2.0, 9.0]], requires_grad=True)
    old_values = torch.tensor([[0.0, 0.4], [2.5, 0.0]])
    returns = torch.tensor([[2.0, 0.0], [3.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss = ppo_value_loss(values, old_values, returns, mask, clip_eps=0.2)
    assert loss.dim() == 0
    # (0,0): v=1 clipped to 0.2: max(1, 3.24) = 3.24 (clip active)
    # (0,1): v=0.5 within 0.4 +- 0.2: max(0.25, 0.25) = 0.25
    # (1,0): v=2 clipped to 2.3: max(1, 0.49) = 1 (unclipped larger)
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.25 + 1.0) / 3, rel=1e-6)
    loss.backward()
    # d/dv of 0.5 (v - R)^2 / 3 where unclipped is active; 0 where the clipped term is.
    assert values.grad.flatten().tolist() == pytest.approx([0.0, 0.5 / 3, -1.0 / 3, 0.0], abs=1e-6)


def test_chosen_nll_loss_is_the_mean_per_token_nll():
    from llmsys.rlhf.losses import chosen_nll_loss

    logps = torch.tensor([-6.0, -1.0], requires_grad=True)  # summed over 3 and 2 tokens
    loss = chosen_nll_loss(logps, torch.tensor([3, 2]))
    assert loss.item() == pytest.approx((6.0 / 3 + 1.0 / 2) / 2)
    loss.backward()
    assert logps.grad.tolist() == pytest.approx([-1 / 6, -1 / 4])
