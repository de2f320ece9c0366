"""decode_attention (CPU twin / CUDA flash-decoding kernel) against decode_attention_ref.

The truth is decode_attention_ref in float64 on the same inputs. fp32 is held to a tight absolute
tolerance; fp16/bf16 are judged against PyTorch's own error, as flash-attention's tests do: the
kernel's max error must stay within 2x that of decode_attention_ref run in the same dtype (+ eps).
Forcing num_splits (1, 3, 7) exercises the split-and-combine arithmetic on the CPU twin too, including
splits left empty by short sequences. The `test_gpu_*` tests run the same checks on a CUDA device
(skipped here), plus a 32k cache; `pytest tests/kernels -k test_gpu_` selects them (gpu_check.sh).
"""
from __future__ import annotations

import pytest
import torch

from llmsys.kernels.decode_attention import decode_attention, decode_attention_num_splits, decode_attention_ref

FP32_ATOL = 2e-5
LOW_PRECISION_EPS = 1e-4  # slack added to 2x PyTorch's own error for fp16/bf16
LOW_PRECISION = (torch.float16, torch.bfloat16)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", autouse=True)
def _extension():
    """Build (or load the cached) llmsys._C once, before the first test times anything."""
    from llmsys.kernels._ext import load_extension

    load_extension()


def _inputs(B, Hq, Hkv, D, S_max, lengths, dtype, device="cpu", seed=0, q_scale=1.0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=gen) * q_scale
    k = torch.randn(B, S_max, Hkv, D, generator=gen)
    v = torch.randn(B, S_max, Hkv, D, generator=gen)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    return *(t.to(device=device, dtype=dtype) for t in (q, k, v)), seqlens.to(device)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _assert_close_to_truth(q, k, v, seqlens, softmax_scale=None, num_splits=None):
    truth = decode_attention_ref(q.double(), k.double(), v.double(), seqlens, softmax_scale)
    got = decode_attention(q, k, v, seqlens, softmax_scale, num_splits=num_splits)
    assert got.shape == q.shape and got.dtype == q.dtype and got.device == q.device
    assert torch.isfinite(got).all()
    empty = (seqlens == 0).nonzero().flatten()
    assert (got[empty] == 0).all(), "a sequence of length 0 must give zeros"
    err = _max_err(got, truth)
    if q.dtype == torch.float32:
        assert err <= FP32_ATOL, f"max error {err:.2e} > {FP32_ATOL:.0e}"
    else:
        ref_err = _max_err(decode_attention_ref(q, k, v, seqlens, softmax_scale), truth)
        assert err <= 2 * ref_err + LOW_PRECISION_EPS, (
            f"kernel error {err:.2e} > 2 x PyTorch {q.dtype} error {ref_err:.2e} + eps")
    return got


# (B, Hq, Hkv, D, S_max, cache lengths): lengths 0, 1 and S_max, odd sizes that cross the key tiles,
# GQA ratios 1, 4 and 8 (and MQA), batch 1..5, head_dim 64 and 128 throughout, 32 and 256 once each.
CASES = [
    (1, 4, 4, 64, 37, [37]),
    (3, 8, 2, 64, 50, [0, 1, 50]),
    (5, 16, 2, 128, 203, [203, 0, 1, 113, 17]),
    (2, 8, 1, 128, 130, [1, 130]),
    (4, 4, 1, 64, 67, [66, 67, 3, 0]),
    (2, 6, 2, 128, 96, [95, 33]),  # group of 3: not a power of two
    (2, 4, 2, 32, 33, [33, 20]),
    (1, 8, 1, 256, 40, [39]),
]
SPLITS = [1, 3, 7, None]


@pytest.mark.parametrize("num_splits", SPLITS)
@pytest.mark.parametrize("B, Hq, Hkv, D, S_max, lengths", CASES)
def test_fp32_matches_reference(B, Hq, Hkv, D, S_max, lengths, num_splits):
    _assert_close_to_truth(*_inputs(B, Hq, Hkv, D, S_max, lengths, torch.float32), num_splits=num_splits)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["fp16", "bf16"])
@pytest.mark.parametrize("num_splits", [1, 7])
@pytest.mark.parametrize("B, Hq, Hkv, D, S_max, lengths", CASES[1:5])
def test_low_precision_within_pytorch_error(B, Hq, Hkv, D, S_max, lengths, num_splits, dtype):
    _assert_close_to_truth(*_inputs(B, Hq, Hkv, D, S_max, lengths, dtype, seed=1), num_splits=num_splits)


def test_split_counts_agree():
    """Every split count computes the same function (up to fp32 rounding), including more splits than keys."""
    inputs = _inputs(3, 8, 2, 64, 90, [90, 5, 41], torch.float32, seed=2)
    outs = [decode_attention(*inputs, num_splits=n) for n in (1, 2, 3, 7, 64, 128)]
    for out in outs[1:]:
        assert _max_err(out, outs[0]) <= 1e-5


def test_large_scores_are_stable():
    """Scores of a few hundred (q scaled x30) must not overflow the exponentials of any split."""
    inputs = _inputs(2, 8, 2, 128, 77, [77, 40], torch.float32, seed=3, q_scale=30.0)
    for n in (1, 3, 7):
        _assert_close_to_truth(*inputs, num_splits=n)


def test_custom_softmax_scale():
    _assert_close_to_truth(*_inputs(2, 4, 2, 64, 45, [45, 12], torch.float32, seed=4), softmax_scale=0.05,
                           num_splits=3)


def _strided(B, Hq, Hkv, D, S_max, lengths, dtype, device="cpu", seed=5):
    """Non-contiguous views: q with a padded head stride; caches sliced from larger buffers along B, S, H,
    one of them a (B, Hkv, S, D) allocation seen through a transpose."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, Hq, 2 * D, generator=gen)[:, :, :D]
    k = torch.randn(2 * B, S_max + 5, 2 * Hkv, D, generator=gen)[::2, 3:3 + S_max, 1::2]
    v = torch.randn(B, Hkv, S_max, D, generator=gen).transpose(1, 2)
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    return q, k, v, torch.tensor(lengths, dtype=torch.int32, device=device)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_strided_inputs(num_splits):
    q, k, v, seqlens = _strided(3, 8, 2, 64, 41, [41, 1, 20], torch.float32)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _assert_close_to_truth(q, k, v, seqlens, num_splits=num_splits)


def test_strided_bf16():
    _assert_close_to_truth(*_strided(2, 8, 1, 128, 30, [30, 7], torch.bfloat16), num_splits=3)


def test_empty_batch():
    q, k, v, _ = _inputs(1, 4, 2, 64, 8, [8], torch.float32)
    out = decode_attention(q[:0], k[:0], v[:0], torch.zeros(0, dtype=torch.int32))
    assert out.shape == (0, 4, 64)


def _good():
    return _inputs(2, 4, 2, 64, 16, [16, 3], torch.float32)


@pytest.mark.parametrize("mutate, match", [
    (lambda q, k, v, s: (q[..., :48], k[..., :48], v[..., :48], s), "head_dim"),
    (lambda q, k, v, s: (q[:, :3], k, v, s), "must divide"),
    (lambda q, k, v, s: (q.double(), k.double(), v.double(), s), "dtype"),
    (lambda q, k, v, s: (q, k.half(), v, s), "share a dtype"),
    (lambda q, k, v, s: (q, k, v, s.long()), "int32"),
    (lambda q, k, v, s: (q, k, v, s[:1]), "int32 of shape"),
    (lambda q, k, v, s: (q, k, v, s + 14), r"\[0, S_max=16\]"),
    (lambda q, k, v, s: (q, k, v, s - 4), r"\[0, S_max=16\]"),
    (lambda q, k, v, s: (q[:, None], k, v, s), r"q must be \(B, Hq, D\)"),
    (lambda q, k, v, s: (q, k, v[:, :8], s), "k_cache and v_cache"),
    (lambda q, k, v, s: (q[:1], k, v, s), "does not match"),
    (lambda q, k, v, s: (q, k.transpose(1, 3).contiguous().transpose(1, 3), v, s), "contiguous"),
])
def test_refuses_bad_arguments(mutate, match):
    with pytest.raises(ValueError, match=match):
        decode_attention(*mutate(*_good()))


@pytest.mark.parametrize("num_splits", [0, 129])
def test_refuses_bad_split_count(num_splits):
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(*_good(), num_splits=num_splits)


def test_op_checks_without_the_wrapper():
    """torch.ops.llmsys.decode_attention called directly still refuses (no out-of-bounds reads)."""
    q, k, v, s = _good()
    with pytest.raises(ValueError, match="head_dim"):
        torch.ops.llmsys.decode_attention(q[..., :48], k[..., :48], v[..., :48], s, None, 0)
    with pytest.raises(RuntimeError, match="cache_seqlens"):
        torch.ops.llmsys.decode_attention(q, k, v, s + 14, None, 0)
    with pytest.raises(ValueError, match="num_splits"):
        torch.ops.llmsys.decode_attention(q, k, v, s, None, 500)


@pytest.mark.parametrize("batch, max_seqlen, want", [
    (1, 32768, 128),  # 4 blocks per split at batch 1: as many splits as 256-position chunks allow (cap 128)
    (1, 512, 2),      # short cache: chunks stay >= 256 positions
    (16, 4096, 9),    # 64 blocks per split: 9 splits fill 4 x 132 SMs
    (128, 4096, 2),
    (256, 4096, 1),   # 1024 blocks already fill the GPU
])
def test_split_heuristic(batch, max_seqlen, want):
    """The documented heuristic (decode_attention.h) at GQA 8:1 with 4 kv heads on a 132-SM GPU."""
    assert decode_attention_num_splits(batch, 32, 4, max_seqlen, sm_count=132) == want
    # More than 8 query heads per kv head take several blocks (group tiles), hence fewer splits.
    assert decode_attention_num_splits(1, 64, 1, 32768, sm_count=132) == 66


def test_reference_matches_per_sequence_sdpa():
    """The reference itself, against SDPA on each sequence's slice with the kv heads repeated."""
    q, k, v, seqlens = _inputs(3, 8, 2, 64, 20, [20, 0, 9], torch.float64, seed=6)
    ref = decode_attention_ref(q, k, v, seqlens)
    for b, L in enumerate(seqlens.tolist()):
        if L == 0:
            assert (ref[b] == 0).all()
            continue
        kb, vb = (t[b, :L].transpose(0, 1).repeat_interleave(4, dim=0) for t in (k, v))  # (Hq, L, D)
        want = torch.nn.functional.scaled_dot_product_attention(q[b][:, None], kb, vb)[:, 0]
        assert _max_err(ref[b], want) < 1e-12


# --- GPU (skipped without CUDA) -------------------------------------------------------------------------

GPU_DTYPES = [(torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")]


@needs_cuda
@pytest.mark.parametrize("dtype", [d for d, _ in GPU_DTYPES], ids=[n for _, n in GPU_DTYPES])
@pytest.mark.parametrize("num_splits", SPLITS)
@pytest.mark.parametrize("B, Hq, Hkv, D, S_max, lengths", CASES)
def test_gpu_matches_reference(B, Hq, Hkv, D, S_max, lengths, num_splits, dtype):
    _assert_close_to_truth(*_inputs(B, Hq, Hkv, D, S_max, lengths, dtype, device="cuda"), num_splits=num_splits)


@needs_cuda
@pytest.mark.parametrize("dtype", [d for d, _ in GPU_DTYPES], ids=[n for _, n in GPU_DTYPES])
def test_gpu_strided_inputs(dtype):
    _assert_close_to_truth(*_strided(3, 8, 2, 128, 300, [300, 1, 77], dtype, device="cuda"), num_splits=3)
    _assert_close_to_truth(*_strided(2, 32, 4, 64, 1000, [999, 0], dtype, device="cuda"))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_long_cache_32k(dtype):
    """A 32k cache at GQA 8:1 (the benchmark's head layout), heuristic and forced split counts."""
    inputs = _inputs(2, 32, 4, 128, 32768, [32768, 20001], dtype, device="cuda", seed=7)
    for num_splits in (None, 1, 128):
        _assert_close_to_truth(*inputs, num_splits=num_splits)


@needs_cuda
def test_gpu_large_batch_and_scores():
    _assert_close_to_truth(*_inputs(64, 16, 2, 128, 257, list(range(0, 257, 4)), torch.bfloat16, device="cuda",
                                    seed=8, q_scale=10.0))


@needs_cuda
def test_gpu_refuses_misaligned_rows():
    """16-byte vector loads need 16-byte aligned rows; an odd position stride is refused, not misread."""
    q, k, v, seqlens = _inputs(2, 4, 2, 64, 16, [16, 3], torch.float16, device="cuda")
    k_odd = torch.zeros(2, 16, 2 * 64 + 1, device="cuda", dtype=torch.float16)[:, :, :128].view(2, 16, 2, 64)
    with pytest.raises(RuntimeError, match="aligned"):
        decode_attention(q, k_odd, v, seqlens)
