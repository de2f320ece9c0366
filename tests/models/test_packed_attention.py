"""SDPA over a packed row runs once per chunk of whole sequences; it must equal attending sequence by sequence."""
from __future__ import annotations

import pytest
import torch

from llmsys.config import ModelConfig
from llmsys.models import Transformer
from llmsys.models import transformer as tm

CFG = ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=80, vocab_size=97, max_seq_len=64)


def test_chunks_hold_whole_sequences_up_to_the_cap():
    assert tm._chunk_bounds([7, 1, 19, 13], cap=20) == [(0, 8, 2), (8, 27, 1), (27, 40, 1)]
    assert tm._chunk_bounds([30, 3, 0, 4], cap=8) == [(0, 30, 1), (30, 37, 2)]  # longer than the cap: alone
    assert tm._chunk_bounds([5, 5, 5], cap=100) == [(0, 15, 3)]
    assert tm._chunk_bounds([0, 0, 6], cap=4) == [(0, 6, 1)]  # empty sequences take no tokens


@pytest.mark.parametrize("cap", [1, 12, 30, 256])
def test_packed_forward_and_backward_equal_separate_sequences(monkeypatch, cap):
    monkeypatch.setattr(tm, "PACKED_CHUNK_TOKENS", cap)
    torch.manual_seed(0)
    model = Transformer(CFG)
    lengths = [7, 1, 19, 0, 13, 3, 29]
    ids = torch.randint(0, CFG.vocab_size, (1, sum(lengths)))
    labels = torch.randint(0, CFG.vocab_size, (1, sum(lengths)))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packing = tm.Packing.from_cu_seqlens(cu, sum(lengths), build_chunks=True)
    assert packing.chunks[0][0] == 0 and packing.chunks[-1][1] == sum(lengths)
    assert all(a < b for a, b, _ in packing.chunks)

    logp, _ = model(ids, labels=labels, cu_seqlens=cu, logprobs_temperature=1.0)
    logp.sum().backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    parts = [model(ids[:, a:b], labels=labels[:, a:b], logprobs_temperature=1.0)[0]
             for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()) if b > a]
    separate = torch.cat(parts, dim=1)
    separate.sum().backward()
    torch.testing.assert_close(logp, separate, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
