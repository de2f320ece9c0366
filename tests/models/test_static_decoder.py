"""StaticDecoder (llmsys/models/generation.py): the preallocated-cache step, eager, compiled and CUDA-graph
captured, must generate exactly what ``generate`` does without it, greedy and seeded sampling alike."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from llmsys.config import ModelConfig
from llmsys.models import Transformer
from llmsys.models.generation import StaticDecoder, generate

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=97, max_seq_len=64)
PROMPTS = [[5, 9, 13], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42, 42]]
NEW = 12
# The cache generate allocates for PROMPTS: the same length gives bit-identical attention reductions.
MAX_LEN = max(map(len, PROMPTS)) + NEW


def _model(seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    torch.manual_seed(seed)
    with torch.device(device):
        return Transformer(CFG).to(dtype).eval()


def _sample(model, decoder=None, seed=5):
    return generate(model, PROMPTS, NEW, temperature=0.8, top_p=0.9, generator=torch.Generator(
        model.tok_embeddings.weight.device).manual_seed(seed), logprobs_temperature=0.8, decoder=decoder)


def _assert_same_generation(model, decoder) -> None:
    eager = generate(model, PROMPTS, NEW, temperature=0.0)
    assert len(set(map(tuple, eager.tokens.tolist()))) > 1  # not a degenerate constant output
    for _ in range(2):  # the decoder is reused: the second call must not see the first call's cache
        static = generate(model, PROMPTS, NEW, temperature=0.0, decoder=decoder)
        assert torch.equal(static.tokens, eager.tokens)
        assert torch.equal(static.lengths, eager.lengths)
    a, b = _sample(model), _sample(model, decoder)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)


def test_eager_static_decoder_equals_generate_bit_for_bit():
    model = _model()
    decoder = StaticDecoder(model, len(PROMPTS), MAX_LEN, mode="eager")
    _assert_same_generation(model, decoder)
    # Bit for bit: the same operations on the same shapes.
    a, b = _sample(model), _sample(model, decoder)
    assert torch.equal(a.logprobs, b.logprobs)


def test_eager_static_decoder_with_the_decode_kernel():
    # llmsys._C's decode-attention (CPU twin here) in every step, as generate runs it.
    torch.manual_seed(4)
    model = Transformer(dataclasses.replace(CFG, dim=128, decode_attention="fused")).eval()  # head_dim 32
    decoder = StaticDecoder(model, len(PROMPTS), MAX_LEN, mode="eager")
    assert decoder.use_decode_kernel
    assert torch.equal(generate(model, PROMPTS, NEW, temperature=0.0, decoder=decoder).tokens,
                       generate(model, PROMPTS, NEW, temperature=0.0).tokens)


def test_static_decoder_with_eos_and_a_longer_cache():
    model = _model(2)
    free = generate(model, PROMPTS, NEW, temperature=0.0)
    eos = int(free.tokens[0, 3])
    want = generate(model, PROMPTS, NEW, temperature=0.0, eos_id=eos, pad_id=-1)
    # A longer cache than the call needs: same tokens (the extra positions are masked out).
    got = generate(model, PROMPTS, NEW, temperature=0.0, eos_id=eos, pad_id=-1,
                   decoder=StaticDecoder(model, len(PROMPTS), MAX_LEN + 9, mode="eager"))
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
    assert torch.equal(got.finished, want.finished) and bool(got.finished[0])


def test_static_decoder_refuses_what_it_cannot_serve():
    model = _model()
    decoder = StaticDecoder(model, len(PROMPTS), MAX_LEN, mode="eager")
    with pytest.raises(ValueError, match="batches of 4 prompts, got 3"):
        generate(model, PROMPTS[:3], NEW, temperature=0.0, decoder=decoder)
    with pytest.raises(ValueError, match="exceeds the StaticDecoder's cache of 23 positions"):
        generate(model, PROMPTS, NEW + 1, temperature=0.0, decoder=decoder)
    with pytest.raises(ValueError, match="another model"):
        generate(_model(1), PROMPTS, NEW, temperature=0.0, decoder=decoder)
    with pytest.raises(ValueError, match="use_cache=False"):
        generate(model, PROMPTS, NEW, temperature=0.0, decoder=decoder, use_cache=False)
    with pytest.raises(ValueError, match="use_decode_kernel=True differs"):
        generate(model, PROMPTS, NEW, temperature=0.0, decoder=decoder, use_decode_kernel=True)
    with pytest.raises(ValueError, match="mode must be one of"):
        StaticDecoder(model, 4, MAX_LEN, mode="graph")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a model on a CUDA device"):
            StaticDecoder(model, 4, MAX_LEN, mode="cuda_graph")
    with pytest.raises(ValueError, match="cannot trace llmsys's decode-attention kernel"):
        StaticDecoder(model, 4, MAX_LEN, mode="compile", use_decode_kernel=True)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        StaticDecoder(model, 4, CFG.max_seq_len + 1, mode="eager")


@pytest.mark.slow  # torch.compile with inductor's C++ backend: ~45 s cold on 2 cores
def test_compiled_static_decoder_equals_generate():
    model = _model()
    _assert_same_generation(model, StaticDecoder(model, len(PROMPTS), MAX_LEN, mode="compile"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["cuda_graph", "compile"])
def test_gpu_static_decoder_equals_generate(mode):
    # fp32 on the GPU: the captured graph replays generate's own kernels; the compiled step is inductor's.
    model = _model(device="cuda")
    _assert_same_generation(model, StaticDecoder(model, len(PROMPTS), MAX_LEN, mode=mode))
