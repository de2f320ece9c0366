"""KV-cache generation: the cached path must reproduce full recomputation token for token."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from llmsys.config import ModelConfig
from llmsys.models import Transformer
from llmsys.models.generation import generate, sample_next, top_p_filter
from llmsys.models.transformer import KVCache

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=97, max_seq_len=64)


def _model(seed=0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(CFG)
    # Larger weights than the init make the argmax sensitive to every position (a harder test).
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    return model.eval()


PROMPTS = [[5, 9, 13], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42, 42]]


def test_greedy_with_cache_equals_full_recomputation():
    model = _model()
    cached = generate(model, PROMPTS, max_new_tokens=12, temperature=0.0)
    full = generate(model, PROMPTS, max_new_tokens=12, temperature=0.0, use_cache=False)
    assert torch.equal(cached.tokens, full.tokens)
    assert len(set(map(tuple, cached.tokens.tolist()))) > 1  # not a degenerate constant output


def test_decode_kernel_generation_equals_full_recomputation():
    # llmsys._C's decode-attention (CPU twin here, CUDA on a GPU) in every single-token step.
    torch.manual_seed(4)
    model = Transformer(dataclasses.replace(CFG, dim=128, decode_attention="fused")).eval()  # head_dim 32
    fused = generate(model, PROMPTS, max_new_tokens=10, temperature=0.0)  # follows model.decode_attention
    full = generate(model, PROMPTS, max_new_tokens=10, temperature=0.0, use_cache=False)
    assert torch.equal(fused.tokens, full.tokens)


def test_each_prompt_alone_gives_the_same_tokens_as_in_the_batch():
    model = _model(1)
    batch = generate(model, PROMPTS, max_new_tokens=8, temperature=0.0)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], max_new_tokens=8, temperature=0.0)
        assert alone.tokens[0].tolist() == batch.tokens[row].tolist(), row


def test_eos_stops_a_sequence_and_pads_after_it():
    model = _model(2)
    free = generate(model, PROMPTS, max_new_tokens=10, temperature=0.0)
    eos = int(free.tokens[0, 3])  # the first sequence's 4th token becomes the EOS
    stop = free.tokens[0].tolist().index(eos) + 1  # it ends at the first occurrence
    out = generate(model, PROMPTS, max_new_tokens=10, temperature=0.0, eos_id=eos, pad_id=-1)
    first = out.tokens[0].tolist()
    assert first[:stop] == free.tokens[0, :stop].tolist() and first[stop:] == [-1] * (10 - stop)
    assert int(out.lengths[0]) == stop and bool(out.finished[0])
    for row in range(len(PROMPTS)):
        toks = out.tokens[row].tolist()
        n = int(out.lengths[row])
        assert all(t == -1 for t in toks[n:]) and -1 not in toks[:n]
        assert bool(out.finished[row]) == (eos in toks[:n])


def test_sampling_is_reproducible_with_a_generator_and_respects_top_p():
    model = _model(3)
    a = generate(model, PROMPTS, 6, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(5))
    b = generate(model, PROMPTS, 6, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens)
    # top_p tiny: only the argmax survives, so sampling equals greedy.
    greedy = generate(model, PROMPTS, 6, temperature=0.0)
    nucleus = generate(model, PROMPTS, 6, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy.tokens, nucleus.tokens)


def test_top_p_filter_on_hand_values():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = top_p_filter(probs.log(), 0.75).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.75, 0.5 + 0.3 reaches it
    assert top_p_filter(probs.log(), 0.5).isfinite().tolist() == [[True, False, False, False]]
    assert top_p_filter(probs.log(), 1.0).isfinite().all()
    # Order does not matter: the same tokens survive when the vocabulary is permuted.
    perm = torch.tensor([2, 0, 3, 1])
    assert top_p_filter(probs.log()[:, perm], 0.75).isfinite().tolist() == [[False, True, False, True]]
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(probs, 0.0)
    assert sample_next(torch.tensor([[0.1, 3.0, 0.2]]), 0.0, 1.0, None).tolist() == [1]


def test_cache_overflow_and_bad_prompts_are_refused():
    model = _model()
    cache = KVCache.allocate(CFG, 1, 4, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="KV cache holds 4 positions"):
        model.decode(torch.zeros(1, 5, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        KVCache.allocate(CFG, 1, 65, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], 3)
