"""llmsys.rlhf.kl: estimators by hand, controllers' direction and resume."""
import math

import pytest
import torch

from llmsys.rlhf import AdaptiveKLController, FixedKLController, kl_penalty


def test_kl_estimators_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    ref = torch.tensor([[-1.5, -1.0], [-0.5, -2.0]])
    pairs = [(-1.0, -1.5), (-2.0, -1.0), (-0.5, -0.5), (-3.0, -2.0)]
    k1 = [lp - lr for lp, lr in pairs]
    k2 = [0.5 * (lr - lp) ** 2 for lp, lr in pairs]
    k3 = [(math.exp(lr - lp) - 1) - (lr - lp) for lp, lr in pairs]
    assert kl_penalty(logprobs, ref).flatten().tolist() == pytest.approx(k1)
    assert kl_penalty(logprobs, ref, "k2").flatten().tolist() == pytest.approx(k2)
    assert kl_penalty(logprobs, ref, "k3").flatten().tolist() == pytest.approx(k3, rel=1e-6)
    assert torch.all(kl_penalty(logprobs, ref, "k3") >= 0)


def test_kl_estimators_are_unbiased_for_sampled_tokens():
    # Sampling x ~ p, E[k1] = E[k3] = KL(p || q) (Schulman's note); checked on a 4-way categorical.
    torch.manual_seed(0)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True)
    logp, logq = p.log()[x], q.log()[x]
    assert kl_penalty(logp, logq, "k1").mean().item() == pytest.approx(exact, abs=3e-3)
    assert kl_penalty(logp, logq, "k3").mean().item() == pytest.approx(exact, abs=3e-3)


def test_kl_gradient_flows_and_unknown_estimator():
    logprobs = torch.tensor([-1.0, -2.0], requires_grad=True)
    kl_penalty(logprobs, torch.tensor([-1.5, -1.0]), "k3").sum().backward()
    assert logprobs.grad is not None and torch.all(logprobs.grad != 0)
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logprobs, logprobs, "k4")


def test_fixed_controller_never_moves():
    controller = FixedKLController(0.05)
    controller.update(current_kl=100.0, n_steps=64)
    assert controller.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(controller.state_dict())
    assert other.value == 0.05


def test_adaptive_controller_follows_ziegler_update():
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    controller.update(current_kl=6.6, n_steps=256)  # error 0.1
    assert controller.value == pytest.approx(0.2 * (1 + 0.1 * 256 / 10000))
    controller.update(current_kl=60.0, n_steps=256)  # error clipped to 0.2
    assert controller.value == pytest.approx(0.2 * (1 + 0.1 * 256 / 10000) * (1 + 0.2 * 256 / 10000))


def test_adaptive_controller_moves_up_above_target_and_down_below():
    up = AdaptiveKLController(0.1, target=1.0, horizon=100)
    up.update(2.0, n_steps=10)
    assert up.value > 0.1
    down = AdaptiveKLController(0.1, target=1.0, horizon=100)
    down.update(0.5, n_steps=10)
    assert down.value < 0.1
    same = AdaptiveKLController(0.1, target=1.0, horizon=100)
    same.update(1.0, n_steps=10)
    assert same.value == pytest.approx(0.1)


def test_adaptive_controller_state_round_trip():
    controller = AdaptiveKLController(0.1, target=1.0, horizon=100)
    for kl in (3.0, 0.2, 1.5):
        controller.update(kl, n_steps=8)
    resumed = AdaptiveKLController(0.5, target=9.0, horizon=1)
    resumed.load_state_dict(controller.state_dict())
    for obj in (controller, resumed):
        obj.update(2.0, n_steps=8)
    assert resumed.value == controller.value
