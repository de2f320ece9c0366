"""The log-prob mismatch gate: the decode path's log-probs of sampled tokens against the training forward's.

~0 when both paths share the arithmetic (fp32 KV-cache decode vs a full fp32 forward); a decode path in a
lower precision (bf16 weights) is detected, and the gate stops with a diagnostic naming the token."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from llmsys.config import GRPOConfig, ModelConfig
from llmsys.data import Tokenizer
from llmsys.models import Transformer
from llmsys.models.generation import generate
from llmsys.rlhf.rollout import build_rollout, logprob_mismatch, policy_logprobs, truncated_is_weights
from llmsys.trainers.grpo import LogprobMismatchError, check_mismatch

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=97, max_seq_len=64)
PROMPTS = [[5, 9, 13], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42, 42, 3]]


def rollout_of(decoder: Transformer, trainer: Transformer, temperature: float = 0.8):
    gen = generate(decoder, PROMPTS, max_new_tokens=10, temperature=temperature, eos_id=96,
                   generator=torch.Generator().manual_seed(3), logprobs_temperature=temperature)
    rollout = build_rollout(PROMPTS, gen.tokens, gen.lengths, gen.finished, 0)
    rollout.sampler_logprobs = gen.logprobs * rollout.mask
    with torch.no_grad():
        rollout.logprobs = policy_logprobs(trainer, rollout, temperature)[0]
    return gen, rollout


def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG).eval()


def test_shared_arithmetic_gives_no_mismatch():
    fp32 = model()
    gen, rollout = rollout_of(fp32, fp32)
    assert int(gen.lengths.sum()) > 20
    stats = logprob_mismatch(rollout)
    assert stats["logprob_diff_mean"] < 1e-5 and stats["logprob_diff_max"] < 1e-4, stats
    assert torch.allclose(truncated_is_weights(rollout, 2.0), rollout.mask, atol=1e-4)


def test_a_lower_precision_decode_path_is_detected_and_stops_the_run(caplog):
    fp32 = model()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    _, rollout = rollout_of(bf16, fp32)
    stats = logprob_mismatch(rollout)
    shared = logprob_mismatch(rollout_of(fp32, fp32)[1])
    # bf16 weights and activations on the decode path: measured 8e-4 per token here, >100x the fp32 gap
    assert stats["logprob_diff_mean"] > max(1e-4, 100 * shared["logprob_diff_mean"]), (stats, shared)
    tokenizer = Tokenizer.__new__(Tokenizer)  # only id_to_token is needed for the message
    tokenizer.id_to_token = lambda i: f"<{i}>"
    with caplog.at_level(logging.WARNING):
        check_mismatch(stats, GRPOConfig(logprob_diff_warn=stats["logprob_diff_mean"] / 2, logprob_diff_stop=0.0),
                       step=3, rollout=rollout, tokenizer=tokenizer)
    assert "exceeds grpo.logprob_diff_warn" in caplog.text
    with pytest.raises(LogprobMismatchError, match=r"iteration 3: .* differ .* Worst on this rank: row \d+, "
                                                   r"response token \d+ \('<\d+>'\): decode -?\d"):
        check_mismatch(stats, GRPOConfig(logprob_diff_stop=stats["logprob_diff_mean"] / 2), step=3, rollout=rollout,
                       tokenizer=tokenizer)
    weights = truncated_is_weights(rollout, 1.5)
    assert weights.max() <= 1.5 and not torch.allclose(weights, rollout.mask)


def test_recorded_logprobs_are_zero_after_a_sequence_ends():
    fp32 = model()
    gen, rollout = rollout_of(fp32, fp32, temperature=1.5)
    for b in range(len(PROMPTS)):
        assert torch.all(gen.logprobs[b, int(gen.lengths[b]):] == 0)
        assert torch.all(gen.logprobs[b, :int(gen.lengths[b])] < 0)
