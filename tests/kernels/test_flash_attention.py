"""flash_attention (Triton, FA2) against flash_attention_ref: forward output and dq, dk, dv.

The truth is flash_attention_ref in float64 on the same inputs. fp32 is held to a tight absolute
tolerance; fp16/bf16 are judged against PyTorch's own error, as flash-attention's tests do: the
kernel's max error must stay within 2x that of flash_attention_ref run in the same dtype (+ eps).
On the CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py), so shapes stay small;
the larger bf16/fp16 shapes run only where CUDA is available.
"""
from __future__ import annotations

import os

import pytest
import torch

from llmsys.kernels.flash_attention import flash_attention, flash_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NAMES = ("out", "dq", "dk", "dv")
FP32_ATOL = 1e-4
LOW_PRECISION_EPS = 1e-4  # slack added to 2x PyTorch's own error for fp16/bf16

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(q_shape, kv_shape, dtype, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(s, generator=gen) for s in (q_shape, kv_shape, kv_shape))
    dout = torch.randn(q_shape, generator=gen)
    return [t.to(device=DEVICE, dtype=dtype) for t in (q, k, v, dout)]


def _forward_backward(fn, q, k, v, dout, **kwargs):
    """(out, dq, dk, dv) of fn at (q, k, v) with upstream gradient dout."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))


def _max_err(results, truth):
    return [(r.double() - t).abs().max().item() for r, t in zip(results, truth)]


def _assert_close_to_truth(q, k, v, dout, **kwargs):
    """Kernel vs float64 reference: tight for fp32, within 2x PyTorch's own error for fp16/bf16."""
    truth = _forward_backward(flash_attention_ref, *(t.double() for t in (q, k, v, dout)), **kwargs)
    got = _forward_backward(flash_attention, q, k, v, dout, **kwargs)
    for name, g, t in zip(NAMES, got, truth):
        assert g.shape == t.shape and g.dtype == q.dtype, name
        assert torch.isfinite(g).all(), name
    errs = _max_err(got, truth)
    if q.dtype == torch.float32:
        for name, err in zip(NAMES, errs):
            assert err <= FP32_ATOL, f"{name}: max error {err:.2e} > {FP32_ATOL:.0e}"
    else:
        base = _max_err(_forward_backward(flash_attention_ref, q, k, v, dout, **kwargs), truth)
        for name, err, ref_err in zip(NAMES, errs, base):
            assert err <= 2 * ref_err + LOW_PRECISION_EPS, (
                f"{name}: kernel error {err:.2e} > 2 x PyTorch {q.dtype} error {ref_err:.2e} + eps")


# (B, Tq, Tk, Hq, Hkv, D, causal, dtype): odd lengths that cross block tails and the diagonal in
# the interpreter's 16/32 tiles, GQA and MQA, Tq != Tk both ways (bottom-right causal alignment;
# Tq > Tk leaves rows with no visible key), every head_dim tier once. Not the full cross product.
DENSE_CASES = [
    (1, 1, 1, 2, 2, 16, True, torch.float32),
    (2, 17, 17, 4, 2, 32, True, torch.float32),
    (1, 67, 67, 4, 1, 64, False, torch.float32),
    (2, 130, 130, 2, 2, 16, True, torch.float32),
    (1, 67, 130, 4, 2, 32, True, torch.float32),
    (1, 130, 67, 2, 1, 16, True, torch.float32),
    (2, 17, 67, 2, 2, 64, False, torch.float32),
    (1, 1, 67, 4, 2, 32, True, torch.float32),
    (1, 40, 1, 2, 1, 16, False, torch.float32),
    (1, 17, 17, 2, 1, 128, True, torch.float32),
    (1, 17, 33, 1, 1, 256, False, torch.float32),
    (2, 67, 67, 4, 2, 64, True, torch.float16),
    (1, 130, 130, 2, 1, 32, False, torch.float16),
    (1, 17, 40, 2, 2, 16, True, torch.float16),
    (2, 130, 67, 4, 1, 32, True, torch.float16),
]


@pytest.mark.parametrize("B,Tq,Tk,Hq,Hkv,D,causal,dtype", DENSE_CASES)
def test_dense_matches_reference(B, Tq, Tk, Hq, Hkv, D, causal, dtype):
    q, k, v, dout = _inputs((B, Tq, Hq, D), (B, Tk, Hkv, D), dtype)
    _assert_close_to_truth(q, k, v, dout, causal=causal)


def _cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


# (sequence lengths, Hq, Hkv, D, causal, dtype)
VARLEN_CASES = [
    ([1, 17, 40], 4, 2, 32, True, torch.float32),
    ([1, 17, 40], 2, 1, 16, False, torch.float32),
    ([130], 2, 2, 64, True, torch.float32),
    ([5, 0, 33], 2, 2, 16, True, torch.float32),
    ([1, 17, 40], 4, 2, 64, True, torch.float16),
    ([17, 1, 67], 4, 1, 16, False, torch.float16),
]


@pytest.mark.parametrize("lengths,Hq,Hkv,D,causal,dtype", VARLEN_CASES)
def test_varlen_matches_reference(lengths, Hq, Hkv, D, causal, dtype):
    total = sum(lengths)
    q, k, v, dout = _inputs((total, Hq, D), (total, Hkv, D), dtype)
    _assert_close_to_truth(q, k, v, dout, causal=causal, cu_seqlens=_cu_seqlens(lengths))


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_equals_dense_per_sequence(causal):
    lengths, Hq, Hkv, D = [3, 17, 40], 4, 2, 32
    total = sum(lengths)
    q, k, v, dout = _inputs((total, Hq, D), (total, Hkv, D), torch.float32, seed=1)
    cu = _cu_seqlens(lengths)
    packed = _forward_backward(flash_attention, q, k, v, dout, causal=causal, cu_seqlens=cu, max_seqlen=max(lengths))
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        alone = _forward_backward(flash_attention, *(t[s:e][None] for t in (q, k, v, dout)), causal=causal)
        for name, p, a in zip(NAMES, packed, alone):
            torch.testing.assert_close(p[s:e], a[0], atol=1e-6, rtol=0, msg=f"{name} of tokens {s}:{e}")


def test_softmax_scale_override():
    q, k, v, dout = _inputs((1, 33, 2, 32), (1, 33, 2, 32), torch.float32, seed=2)
    _assert_close_to_truth(q, k, v, dout, causal=True, softmax_scale=0.3)
    default = flash_attention(q, k, v, causal=True)
    scaled = flash_attention(q, k, v, causal=True, softmax_scale=0.3)
    assert (default - scaled).abs().max() > 1e-2  # the override is actually used


def test_strided_inputs_without_copy():
    # q, k, v as slices of one packed projection (B, T, 3, H, D): token stride 3*H*D, no copy;
    # and a (B, H, T, D) tensor viewed as (B, T, H, D).
    B, T, H, D = 2, 67, 2, 32
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, T, 3, H, D, generator=gen).to(DEVICE)
    dout = torch.randn(B, T, H, D, generator=gen).to(DEVICE)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    _assert_close_to_truth(q, k, v, dout, causal=True)
    q_bhtd = torch.randn(B, H, T, D, generator=gen).to(DEVICE)
    _assert_close_to_truth(q_bhtd.transpose(1, 2), k, v, dout, causal=False)


def test_zero_length_keys_and_queries():
    q, k, v, _ = _inputs((1, 0, 2, 16), (1, 5, 2, 16), torch.float32)
    assert flash_attention(q, k, v).shape == (1, 0, 2, 16)
    q, k, v, _ = _inputs((1, 4, 2, 16), (1, 0, 2, 16), torch.float32)
    assert torch.equal(flash_attention(q, k, v, causal=False), torch.zeros_like(q))


def _bad(**overrides):
    args = dict(zip("qkv", _inputs((1, 8, 4, 32), (1, 8, 2, 32), torch.float32)[:3]))
    args.update(overrides)
    return args


@pytest.mark.parametrize("args,match", [
    (lambda: _bad(q=torch.randn(1, 8, 4, 48), k=torch.randn(1, 8, 2, 48), v=torch.randn(1, 8, 2, 48)), "head_dim 48"),
    (lambda: _bad(k=torch.randn(1, 8, 2, 32, dtype=torch.float16)), "share a dtype"),
    (lambda: _bad(q=torch.randn(1, 8, 3, 32)), "must divide"),
    (lambda: _bad(q=torch.randn(1, 8, 4, 64)[..., ::2]), "contiguous in its last"),
    (lambda: _bad(q=torch.randn(8, 4, 32), k=torch.randn(8, 2, 32), v=torch.randn(8, 2, 32),
                  cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int64)), "int32"),
    (lambda: _bad(q=torch.randn(8, 4, 32), k=torch.randn(8, 2, 32), v=torch.randn(8, 2, 32),
                  cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), "rise from 0 to total tokens 8"),
    (lambda: _bad(cu_seqlens=torch.tensor([0, 8], dtype=torch.int32)), r"\(total, H, D\)"),
    (lambda: _bad(max_seqlen=8), "only meaningful with cu_seqlens"),
    (lambda: _bad(v=torch.randn(1, 9, 2, 32)), "same shape"),
], ids=["head_dim", "dtype_mismatch", "gqa_divisibility", "last_dim_stride", "cu_seqlens_dtype",
        "cu_seqlens_total", "varlen_rank", "max_seqlen_dense", "kv_shape"])
def test_refuses_unsupported_inputs(args, match):
    kwargs = args()
    kwargs = {name: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t) for name, t in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        flash_attention(**kwargs)


@pytest.mark.skipif(not INTERPRET, reason="bf16 is only refused under the interpreter")
def test_refuses_bf16_under_interpreter():
    q, k, v, _ = _inputs((1, 8, 2, 16), (1, 8, 2, 16), torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        flash_attention(q, k, v)


# ---------------------------------------------------------------------------------------------
# GPU only: realistic shapes in bf16/fp16 against 2x PyTorch's own error.
# ---------------------------------------------------------------------------------------------
GPU_DENSE_CASES = [
    (2, 128, 128, 8, 2, 64, True),
    (2, 256, 256, 4, 4, 128, True),
    (1, 1024, 1024, 4, 1, 128, True),
    (2, 513, 513, 8, 2, 64, False),
    (1, 200, 1024, 4, 2, 128, True),
    (1, 1024, 300, 4, 2, 64, True),
    (1, 257, 257, 4, 2, 16, True),
    (1, 257, 257, 4, 2, 32, False),
    (1, 257, 257, 2, 1, 256, True),
]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,Tq,Tk,Hq,Hkv,D,causal", GPU_DENSE_CASES)
def test_gpu_dense_low_precision(B, Tq, Tk, Hq, Hkv, D, causal, dtype):
    q, k, v, dout = _inputs((B, Tq, Hq, D), (B, Tk, Hkv, D), dtype)
    _assert_close_to_truth(q, k, v, dout, causal=causal)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_varlen_low_precision(D, dtype):
    lengths = [1, 300, 17, 1024, 129]
    total = sum(lengths)
    q, k, v, dout = _inputs((total, 8, D), (total, 2, D), dtype)
    _assert_close_to_truth(q, k, v, dout, causal=True, cu_seqlens=_cu_seqlens(lengths))


@needs_cuda
def test_gpu_fp32_tight():
    q, k, v, dout = _inputs((2, 300, 4, 64), (2, 300, 2, 64), torch.float32)
    _assert_close_to_truth(q, k, v, dout, causal=True)
