"""llmsys.rlhf.losses against values worked out by hand."""
import math

import pytest
import torch

from llmsys.rlhf import (
    LOSS_AGGS,
    dpo_loss,
    kl_loss,
    masked_agg,
    masked_mean,
    masked_whiten,
    pairwise_reward_loss,
    policy_loss,
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


# --- masked_agg: the three aggregations ----------------------------------------------------------------

# row 0: 3 tokens, row 1: 1 token, row 2: none (an empty row); 100 is padding and must not leak in
AGG_VALUES = [[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0], [100.0, 100.0, 100.0, 100.0]]
AGG_MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("agg,max_len,expected,grad_row0,grad_row1", [
    # (1 + 2 + 3 + 4) / 4 tokens; d/dx = 1/4 on every unmasked token
    ("token-mean", None, 10 / 4, 1 / 4, 1 / 4),
    # rows' token means 6 / 3 = 2 and 4 / 1 = 4, the empty row left out: (2 + 4) / 2; d/dx = 1 / (2 n_i)
    ("seq-mean-token-mean", None, (2 + 4) / 2, 1 / 6, 1 / 2),
    # rows' sums over max_len: 6 / 4 and 4 / 4, (1.5 + 1) / 2; d/dx = 1 / (2 * 4)
    ("seq-mean-token-sum-norm", 4, (1.5 + 1.0) / 2, 1 / 8, 1 / 8),
])
def test_masked_agg_by_hand_with_an_empty_row(agg, max_len, expected, grad_row0, grad_row1):
    values = torch.tensor(AGG_VALUES, requires_grad=True)
    loss = masked_agg(values, AGG_MASK, agg, max_len)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert values.grad.tolist() == [[pytest.approx(grad_row0)] * 3 + [0.0], [pytest.approx(grad_row1), 0.0, 0.0, 0.0],
                                    [0.0] * 4]


def test_masked_agg_errors_name_the_valid_values():
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        masked_agg(x, x, "sum")
    with pytest.raises(ValueError, match="max_len"):
        masked_agg(x, x, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="max_len"):
        masked_agg(x, x, "seq-mean-token-sum-norm", max_len=0)


@pytest.mark.parametrize("agg", LOSS_AGGS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_policy_loss_on_a_batch_without_tokens_is_zero_not_nan(agg, level):
    logprobs = torch.tensor([[-0.7, -1.2], [-2.0, -0.1]], requires_grad=True)
    loss, clipfrac = policy_loss(logprobs, torch.full((2, 2), -1.0), torch.tensor([[1.5, 1.5], [-2.0, -2.0]]),
                                 torch.zeros(2, 2), agg=agg, level=level, max_len=2)
    assert loss.item() == 0.0 and clipfrac.item() == 0.0
    loss.backward()
    assert torch.all(logprobs.grad == 0)


# --- policy_loss: clipping, clip-higher, aggregations ---------------------------------------------------

# logprobs = old + delta, so rho = exp(delta). Row 2 is empty (garbage everywhere).
CLIP_OLD = torch.tensor([[-1.5, -0.5, -2.0], [-1.0, -3.0, -3.0], [-0.2, -0.9, -1.1]])
CLIP_DELTAS = torch.tensor([[0.22, 0.3, -0.3], [0.1, 9.0, 9.0], [0.7, -0.4, 0.2]])
CLIP_LOGPROBS = (CLIP_OLD + CLIP_DELTAS).tolist()
CLIP_ADVANTAGES = torch.tensor([[1.0, 1.0, -1.0], [-2.0, 3.0, 3.0], [5.0, 5.0, 5.0]])
CLIP_MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])


def _clip_higher_tokens():
    # clip_low = 0.2, clip_high = 0.28: rho is clipped to [0.8, 1.28]
    # (0,0) rho = e^0.22 = 1.246, A = +1: above 1 + clip_low but below 1 + clip_high -> NOT clipped: -e^0.22,
    #       gradient d(-A rho)/dlogp = -e^0.22
    # (0,1) rho = e^0.3 = 1.350 > 1.28, A = +1: max(-1.350, -1.28) = -1.28, clipped, no gradient
    # (0,2) rho = e^-0.3 = 0.741 < 0.8, A = -1: max(0.741, 0.8) = 0.8, clipped (lower bound is clip_low), no gradient
    # (1,0) rho = e^0.1 = 1.105, A = -2: within the range, tie, 2 e^0.1, gradient 2 e^0.1
    values = [[-math.exp(0.22), -1.28, 0.8], [2 * math.exp(0.1)]]
    grads = [[-math.exp(0.22), 0.0, 0.0], [2 * math.exp(0.1)]]
    return values, grads


@pytest.mark.parametrize("agg,max_len", [("token-mean", None), ("seq-mean-token-mean", None),
                                         ("seq-mean-token-sum-norm", 5)])
def test_policy_loss_clip_higher_by_hand_for_each_agg(agg, max_len):
    (row0, row1), (grad0, grad1) = _clip_higher_tokens()
    if agg == "token-mean":          # 4 unmasked tokens in the batch
        expected, w0, w1 = (sum(row0) + sum(row1)) / 4, 1 / 4, 1 / 4
    elif agg == "seq-mean-token-mean":  # 2 non-empty rows of 3 and 1 tokens
        expected, w0, w1 = (sum(row0) / 3 + sum(row1) / 1) / 2, 1 / 6, 1 / 2
    else:                            # 2 non-empty rows, sums over max_len = 5
        expected, w0, w1 = (sum(row0) / 5 + sum(row1) / 5) / 2, 1 / 10, 1 / 10
    logprobs = torch.tensor(CLIP_LOGPROBS, requires_grad=True)
    loss, clipfrac = policy_loss(logprobs, CLIP_OLD, CLIP_ADVANTAGES, CLIP_MASK, clip_low=0.2,
                                 clip_high=0.28, agg=agg, max_len=max_len)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert clipfrac.item() == pytest.approx(2 / 4)  # (0,1) and (0,2) of the 4 unmasked tokens, whatever agg
    loss.backward()
    expected_grad = [[g * w0 for g in grad0], [grad1[0] * w1, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert logprobs.grad.flatten().tolist() == pytest.approx(sum(expected_grad, []), rel=1e-5, abs=1e-7)


def test_policy_loss_symmetric_clip_cuts_the_token_clip_higher_keeps():
    # clip_low = clip_high = 0.2: (0,0) rho = e^0.22 = 1.246 > 1.2 with A = +1 is now clipped to -1.2 (no gradient),
    # (0,1) to -1.2; (0,2) 0.8 and (1,0) 2 e^0.1 as before. Token mean over 4 tokens; clipfrac 3 / 4.
    logprobs = torch.tensor(CLIP_LOGPROBS, requires_grad=True)
    loss, clipfrac = policy_loss(logprobs, CLIP_OLD, CLIP_ADVANTAGES, CLIP_MASK, clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx((-1.2 - 1.2 + 0.8 + 2 * math.exp(0.1)) / 4, rel=1e-5)
    assert clipfrac.item() == pytest.approx(3 / 4)
    loss.backward()
    assert logprobs.grad.flatten().tolist() == pytest.approx([0, 0, 0, 2 * math.exp(0.1) / 4, 0, 0, 0, 0, 0],
                                                             rel=1e-5, abs=1e-7)


def test_policy_loss_inactive_clip_is_the_plain_surrogate_for_each_agg():
    # logprobs - old = 0.05, -0.1, 0.15: ratios e^0.05, e^-0.1, e^0.15 all inside [0.8, 1.2]: loss = -A rho everywhere
    old = torch.tensor([[-0.8, -2.5], [-1.25, -1.0]])
    logprobs = (old + torch.tensor([[0.05, -0.1], [0.15, 4.0]])).requires_grad_()
    advantages = torch.tensor([[2.0, -1.0], [0.5, 7.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    t = [-2 * math.exp(0.05), math.exp(-0.1), -0.5 * math.exp(0.15)]
    expected = {"token-mean": sum(t) / 3, "seq-mean-token-mean": ((t[0] + t[1]) / 2 + t[2]) / 2,
                "seq-mean-token-sum-norm": ((t[0] + t[1]) / 3 + t[2] / 3) / 2}
    for agg, value in expected.items():
        loss, clipfrac = policy_loss(logprobs, old, advantages, mask, agg=agg, max_len=3)
        assert loss.item() == pytest.approx(value, rel=1e-5), agg
        assert clipfrac.item() == 0.0


def test_policy_loss_unknown_agg_or_level_names_the_valid_values():
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean, seq-mean-token-sum-norm"):
        policy_loss(x, x, x, x, agg="seq-sum")
    with pytest.raises(ValueError, match="token, sequence"):
        policy_loss(x, x, x, x, level="group")


# --- GSPO: the sequence-level ratio ------------------------------------------------------------------------

# row 0: 2 tokens, logprobs - old = [0.3, -0.1] -> mean 0.1 -> s_0 = e^0.1 = 1.105 (token ratio e^0.3 would clip)
# row 1: 3 tokens, logprobs - old = [0.5, 0.5, -0.1] -> mean 0.3 -> s_1 = e^0.3 = 1.350
GSPO_LOGPROBS = [[-1.0, -2.0, 5.0], [-0.5, -0.5, -1.0]]
GSPO_OLD = torch.tensor([[-1.3, -1.9, 0.0], [-1.0, -1.0, -0.9]])
GSPO_ADVANTAGES = torch.tensor([[2.0, 2.0, 9.0], [1.0, 1.0, 1.0]])
GSPO_MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


def test_gspo_sequence_ratio_value_and_gradient_without_clipping():
    # clip range 10: nothing clipped. Every token of row i has value -A_i s_i and gradient -A_i s_i
    # (GSPO-token: s_{i,t} = sg[s_i] pi / sg[pi]), then the token mean over 5 tokens:
    # loss = (2 * (-2 e^0.1) + 3 * (-e^0.3)) / 5; grad row 0 = -2 e^0.1 / 5, row 1 = -e^0.3 / 5
    logprobs = torch.tensor(GSPO_LOGPROBS, requires_grad=True)
    loss, clipfrac = policy_loss(logprobs, GSPO_OLD, GSPO_ADVANTAGES, GSPO_MASK, clip_low=10.0, clip_high=10.0,
                                 level="sequence")
    assert loss.item() == pytest.approx((-4 * math.exp(0.1) - 3 * math.exp(0.3)) / 5, rel=1e-5)
    assert clipfrac.item() == 0.0
    loss.backward()
    g0, g1 = -2 * math.exp(0.1) / 5, -math.exp(0.3) / 5
    assert logprobs.grad.flatten().tolist() == pytest.approx([g0, g0, 0.0, g1, g1, g1], rel=1e-5)


def test_gspo_sequence_ratio_clips_whole_sequences():
    # clip 0.2, seq-mean-token-mean (GSPO's aggregation):
    # row 0: s_0 = e^0.1 inside [0.8, 1.2]: both tokens -2 e^0.1, token mean -2 e^0.1
    # row 1: s_1 = e^0.3 = 1.350 > 1.2 with A = +1: every token max(-1.350, -1.2) = -1.2, clipped
    # loss = (-2 e^0.1 - 1.2) / 2; clipfrac = 3 clipped / 5 tokens
    # grad row 0: d/dlogp_t of (1/2)(1/2)(-2 s_0 pi_t / sg[pi_t]) = -s_0 / 2; row 1 clipped: 0
    logprobs = torch.tensor(GSPO_LOGPROBS, requires_grad=True)
    loss, clipfrac = policy_loss(logprobs, GSPO_OLD, GSPO_ADVANTAGES, GSPO_MASK, agg="seq-mean-token-mean",
                                 level="sequence")
    assert loss.item() == pytest.approx((-2 * math.exp(0.1) - 1.2) / 2, rel=1e-5)
    assert clipfrac.item() == pytest.approx(3 / 5)
    loss.backward()
    g0 = -math.exp(0.1) / 2
    assert logprobs.grad.flatten().tolist() == pytest.approx([g0, g0, 0.0, 0.0, 0.0, 0.0], rel=1e-5, abs=1e-7)
    # the token-level ratio of the same batch differs: (0,0) has rho = e^0.3 > 1.2 with A = 2, clipped
    _, token_clipfrac = policy_loss(logprobs, GSPO_OLD, GSPO_ADVANTAGES, GSPO_MASK, agg="seq-mean-token-mean")
    # token ratios: e^0.3 (A=2, clipped), e^-0.1 (A=2, not), e^0.5, e^0.5 (A=1, clipped), e^-0.1 (A=1, not)
    assert token_clipfrac.item() == pytest.approx(3 / 5)


# --- ppo_policy_loss is policy_loss with a symmetric clip and the token mean, bit for bit ------------------

def _ppo_policy_loss_as_before(logprobs, old_logprobs, advantages, mask, clip_eps):
    # the op order of ppo_policy_loss before policy_loss existed (golden curves compare PPO runs to 1e-6)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask).detach()
    return loss, clipfrac


@pytest.mark.parametrize("seed,clip_eps", [(0, 0.2), (1, 0.1), (2, 0.3)])
def test_ppo_policy_loss_is_policy_loss_bit_for_bit(seed, clip_eps):
    gen = torch.Generator().manual_seed(seed)
    B, T = 5, 9
    lengths = [9, 4, 1, 0, 6]
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    old = torch.randn(B, T, generator=gen) - 2.0
    logprobs_data = old + 0.3 * torch.randn(B, T, generator=gen)
    advantages = torch.randn(B, T, generator=gen)
    results = []
    for fn in (lambda lp: ppo_policy_loss(lp, old, advantages, mask, clip_eps=clip_eps),
               lambda lp: policy_loss(lp, old, advantages, mask, clip_low=clip_eps, clip_high=clip_eps,
                                      agg="token-mean"),
               lambda lp: _ppo_policy_loss_as_before(lp, old, advantages, mask, clip_eps)):
        logprobs = logprobs_data.clone().requires_grad_()
        loss, clipfrac = fn(logprobs)
        loss.backward()
        results.append((loss.detach(), clipfrac, logprobs.grad))
    assert 0.0 < results[0][1].item() < 1.0  # some tokens clipped, some not
    for loss, clipfrac, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(clipfrac, results[0][1])
        assert torch.equal(grad, results[0][2])


# --- KL as a loss term -----------------------------------------------------------------------------------

def test_kl_loss_by_hand_for_each_agg():
    # log r = ref - logprobs: row 0 [ln 2, -ln 2] (+ padding), row 1 [ln 4] (+ padding)
    # k3 = (r - 1) - log r: 1 - ln 2, -0.5 + ln 2 (row 0 sums to 0.5), 3 - ln 4
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -3.0, -3.0]])
    log_r = torch.tensor([[math.log(2), -math.log(2), 5.0], [math.log(4), 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    ref = logprobs + log_r
    k3_row1 = 3 - math.log(4)
    assert kl_loss(logprobs, ref, mask).item() == pytest.approx((0.5 + k3_row1) / 3, rel=1e-5)
    assert kl_loss(logprobs, ref, mask, agg="seq-mean-token-mean").item() == pytest.approx(
        (0.5 / 2 + k3_row1) / 2, rel=1e-5)
    assert kl_loss(logprobs, ref, mask, agg="seq-mean-token-sum-norm", max_len=2).item() == pytest.approx(
        (0.5 / 2 + k3_row1 / 2) / 2, rel=1e-5)
    # k1 = -log r: (-ln 2 + ln 2 - ln 4) / 3
    assert kl_loss(logprobs, ref, mask, estimator="k1").item() == pytest.approx(-math.log(4) / 3, rel=1e-5)
