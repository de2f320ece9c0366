"""Scalar heads (reward model, critic), per-token log-probs of the LM, and PPO's rollout layout."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from llmsys.config import LoRAConfig, ModelConfig
from llmsys.models import Transformer
from llmsys.models.heads import ScalarHeadModel, fresh_head_param
from llmsys.models.transformer import Decoder
from llmsys.rlhf.rollout import build_rollout, critic_values, policy_logprobs

CFG = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)


def test_scalar_head_reads_the_decoder_and_scores_the_last_token():
    torch.manual_seed(0)
    lm = Transformer(CFG)
    model = ScalarHeadModel(CFG)
    missing = model.load_state_dict(lm.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["score.bias", "score.weight"] and all(map(fresh_head_param, missing))
    assert not any(name.startswith("output.") for name, _ in model.named_parameters())
    ids = torch.randint(0, 97, (3, 11))
    values = model(ids)
    assert values.shape == (3, 11) and values.dtype == torch.float32
    expected = model.score(lm.hidden_states(ids)).squeeze(-1)
    torch.testing.assert_close(values, expected)
    last = torch.tensor([10, 4, 0])
    torch.testing.assert_close(model(ids, last_index=last), values[torch.arange(3), last])
    # Right padding after the last token cannot change its score (causal attention).
    padded = torch.cat([ids[:, :5], torch.zeros(3, 6, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded, last_index=torch.tensor([4, 4, 4])), values[:, 4])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_log_softmax(temperature):
    torch.manual_seed(1)
    model = Transformer(CFG)
    ids = torch.randint(0, 97, (2, 13))
    labels = torch.randint(0, 97, (2, 13))
    labels[0, :4] = -100
    logp, entropy = model(ids, labels=labels, logprobs_temperature=temperature)
    log_probs = torch.log_softmax(model(ids).float() / temperature, dim=-1)
    valid = labels != -100
    expected = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    torch.testing.assert_close(logp, expected)
    torch.testing.assert_close(entropy, -(log_probs.exp() * log_probs).sum(-1) * valid)
    assert (logp[0, :4] == 0).all() and (entropy[0, :4] == 0).all()


def test_token_logprobs_fused_kernel_matches_eager():
    torch.manual_seed(2)
    eager = Transformer(CFG)
    fused = Transformer(dataclasses.replace(CFG, loss="fused"))
    fused.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 97, (2, 9))
    labels = torch.randint(0, 97, (2, 9))
    labels[1, 5:] = -100
    for a, b in zip(eager(ids, labels=labels, logprobs_temperature=0.9),
                    fused(ids, labels=labels, logprobs_temperature=0.9)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    grad_e = torch.autograd.grad(eager(ids, labels=labels, logprobs_temperature=1.0)[0].sum(),
                                 eager.tok_embeddings.weight)[0]
    grad_f = torch.autograd.grad(fused(ids, labels=labels, logprobs_temperature=1.0)[0].sum(),
                                 fused.tok_embeddings.weight)[0]
    torch.testing.assert_close(grad_e, grad_f, atol=1e-5, rtol=1e-4)


def test_rollout_layout_puts_each_response_token_after_its_prompt():
    prompts = [[5, 6, 7], [8]]
    tokens = torch.tensor([[11, 12, 0, 0], [21, 22, 23, 24]])
    lengths = torch.tensor([2, 4])
    rollout = build_rollout(prompts, tokens, lengths, torch.tensor([True, False]), filler=0)
    assert rollout.input_ids.tolist() == [[5, 6, 7, 11, 12], [8, 21, 22, 23, 24]]
    assert rollout.labels.tolist() == [[-100, -100, 11, 12, -100], [21, 22, 23, 24, -100]]
    assert rollout.mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert rollout.last_index.tolist() == [4, 4]
    torch.manual_seed(3)
    model = Transformer(CFG)
    logp, _ = policy_logprobs(model, rollout, temperature=1.0)
    log_probs = torch.log_softmax(model(rollout.input_ids).float(), dim=-1)
    assert torch.allclose(logp[0, :2], log_probs[0, [2, 3], [11, 12]]) and (logp[0, 2:] == 0).all()
    assert torch.allclose(logp[1], log_probs[1, [0, 1, 2, 3], [21, 22, 23, 24]])
    critic = ScalarHeadModel(CFG)
    values = critic_values(critic, rollout)
    assert torch.allclose(values[1], critic(rollout.input_ids)[1, :4]) and (values[0, 2:] == 0).all()


@pytest.mark.parametrize("tied,rank", [(False, 0), (True, 0), (False, 2)])
def test_scalar_model_is_the_trunk_plus_a_score_head_and_no_lm_head(tied, rank):
    cfg = dataclasses.replace(CFG, tie_embeddings=tied, lora=LoRAConfig(rank=rank))
    torch.manual_seed(0)
    lm = Transformer(cfg)
    torch.manual_seed(0)
    model = ScalarHeadModel(cfg)
    assert isinstance(model, Decoder) and not isinstance(model, Transformer) and not hasattr(model, "output")
    trunk = [name for name in lm.state_dict() if not name.startswith("output.")]
    assert list(model.state_dict()) == trunk + ["score.weight", "score.bias"]
    # The trunk draws its init first in both models, so it starts the same as the LM's.
    for name in trunk:
        assert torch.equal(model.state_dict()[name], lm.state_dict()[name]), name
    # Under LoRA the trunk trains through its adapters only; the fresh head trains in full.
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {name for name, p in lm.named_parameters() if p.requires_grad and not name.startswith("output.")}
    assert trainable == expected | {"score.weight", "score.bias"}


def test_fresh_score_head_does_not_depend_on_the_trunk():
    torch.manual_seed(5)
    small = ScalarHeadModel(dataclasses.replace(CFG, n_layers=1))
    torch.manual_seed(5)
    large = ScalarHeadModel(dataclasses.replace(CFG, n_layers=3, vocab_size=211))
    assert torch.equal(small.score.weight, large.score.weight) and not small.score.bias.any()
