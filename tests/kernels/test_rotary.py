"""llmsys.kernels.rotary (the CPU twin here, the CUDA kernel in the test_gpu_* tests) against apply_rotary_ref.

fp32 tightly against float64; fp16/bf16 within 2x PyTorch's own error in the input dtype. Odd T and H,
odd D/2, strided (non-contiguous) inputs, in place, and packed positions.
"""
from __future__ import annotations

import pytest
import torch

from llmsys.kernels.rotary import apply_rotary, apply_rotary_ref
from llmsys.models.transformer import apply_rotary as model_apply_rotary
from llmsys.models.transformer import rotary_tables

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _x(B, T, H, D, dtype, device, layout="contiguous", seed=0):
    """(B, T, H, D) in one of three memory layouts: contiguous, a q slice of a fused qkv, or (B, H, T, D)^T."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        return torch.randn(B, T, H, D, generator=gen).to(device, dtype)
    if layout == "qkv_slice":  # q out of a fused (B, T, 3 * H, D) projection: strided over H and T
        return torch.randn(B, T, 3 * H, D, generator=gen).to(device, dtype)[:, :, H:2 * H]
    if layout == "heads_first":  # (B, H, T, D).transpose(1, 2)
        return torch.randn(B, H, T, D, generator=gen).to(device, dtype).transpose(1, 2)
    raise ValueError(layout)


def _run(fn, x, cos, sin, grad, dtype=None):
    xs = (x.detach().clone() if dtype is None else x.detach().to(dtype)).requires_grad_()
    out = fn(xs, cos, sin)
    out.backward(grad.to(out.dtype))
    return [out.detach(), xs.grad]


def _check(B, T, H, D, dtype, device, layout="contiguous"):
    x = _x(B, T, H, D, dtype, device, layout)
    cos, sin = rotary_tables(T, D, 10000.0, device)
    grad = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(7)).to(device, dtype)
    got = _run(apply_rotary, x, cos, sin, grad)
    exact = _run(apply_rotary_ref, x, cos, sin, grad, torch.float64)
    assert got[0].dtype == dtype and got[0].shape == (B, T, H, D)
    if dtype == torch.float32:
        for g, t in zip(got, exact):
            torch.testing.assert_close(g.double(), t, atol=1e-5, rtol=1e-5)
        return
    lowp = _run(apply_rotary_ref, x, cos, sin, grad)
    for name, g, p, t in zip(("out", "dx"), got, lowp, exact):
        ours, theirs = (g.double() - t).abs().max().item(), (p.double() - t).abs().max().item()
        assert ours <= 2 * theirs + 1e-6, f"{name}: kernel error {ours:.3e} > 2 x PyTorch's {theirs:.3e}"


SHAPES = [(1, 1, 1, 2), (2, 17, 3, 64), (3, 5, 7, 10), (1, 33, 4, 128)]


@pytest.mark.parametrize("B,T,H,D", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "qkv_slice", "heads_first"])
def test_fp32_matches_float64_reference(B, T, H, D, layout):
    _check(B, T, H, D, torch.float32, "cpu", layout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,H,D", SHAPES)
def test_low_precision_within_torch_error(B, T, H, D, dtype):
    _check(B, T, H, D, dtype, "cpu", "qkv_slice")


def test_matches_model_apply_rotary_bitwise_in_fp32():
    x = _x(2, 9, 3, 32, torch.float32, "cpu")
    cos, sin = rotary_tables(9, 32, 500000.0)
    torch.testing.assert_close(apply_rotary(x, cos, sin), model_apply_rotary(x, cos, sin), atol=0, rtol=0)


def test_inplace_overwrites_x_and_backpropagates():
    cos, sin = rotary_tables(11, 16, 10000.0)
    base = torch.randn(2, 11, 3 * 5 * 16, requires_grad=True)
    grad = torch.randn(2, 11, 5, 16)
    q = (base * 2).view(2, 11, 15, 16)[:, :, 5:10]  # a non-leaf strided view, as q of a fused projection
    storage = q.data_ptr()
    out = apply_rotary(q, cos, sin, inplace=True)
    assert out is q and out.data_ptr() == storage
    out.backward(grad)
    base_ref = base.detach().double().requires_grad_()
    apply_rotary_ref((base_ref * 2).view(2, 11, 15, 16)[:, :, 5:10], cos, sin).backward(grad.double())
    torch.testing.assert_close(base.grad.double(), base_ref.grad, atol=1e-5, rtol=1e-5)


def test_backward_is_inverse_rotation():
    x = _x(1, 6, 2, 8, torch.float32, "cpu").requires_grad_()
    cos, sin = rotary_tables(6, 8, 10000.0)
    out = apply_rotary(x, cos, sin)
    (out * out.detach()).sum().backward()  # grad = out, so dx = R^-1 R x = x
    torch.testing.assert_close(x.grad, x.detach(), atol=1e-6, rtol=1e-6)


def test_packed_positions():
    positions = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3])  # three packed sequences restart at 0
    cos, sin = rotary_tables(16, 8, 10000.0)
    x = _x(1, 9, 3, 8, torch.float32, "cpu")
    torch.testing.assert_close(apply_rotary(x, cos[positions], sin[positions]),
                               apply_rotary_ref(x, cos[positions], sin[positions]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("make, match", [
    (lambda: (torch.randn(1, 4, 2, 7), *rotary_tables(4, 8, 1e4)), "even"),
    (lambda: (torch.randn(1, 4, 2, 8), *rotary_tables(5, 8, 1e4)), r"\(T, D/2\)"),
    (lambda: (torch.randn(4, 2, 8), *rotary_tables(4, 8, 1e4)), r"\(B, T, H, D\)"),
    (lambda: (torch.randn(1, 4, 2, 8).double(), *rotary_tables(4, 8, 1e4)), "float32, float16 or bfloat16"),
    (lambda: (torch.randn(1, 4, 2, 8), *(t.double() for t in rotary_tables(4, 8, 1e4))), "must be float32"),
    (lambda: (torch.randn(1, 4, 8, 2).transpose(2, 3), *rotary_tables(4, 8, 1e4)), "contiguous"),
])
def test_refuses_bad_inputs(make, match):
    x, cos, sin = make()
    with pytest.raises(ValueError, match=match):
        apply_rotary(x, cos, sin)


def test_inplace_refuses_overlapping_x():
    cos, sin = rotary_tables(4, 8, 1e4)
    x = torch.randn(1, 4, 1, 8).expand(1, 4, 3, 8)
    with pytest.raises(ValueError, match="overlapping"):
        apply_rotary(x, cos, sin, inplace=True)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,H,D", SHAPES + [(2, 257, 32, 128)])
@pytest.mark.parametrize("layout", ["contiguous", "qkv_slice", "heads_first"])
def test_gpu_low_precision_within_torch_error(B, T, H, D, dtype, layout):
    _check(B, T, H, D, dtype, "cuda", layout)


@needs_cuda
@pytest.mark.parametrize("B,T,H,D", SHAPES)
def test_gpu_fp32_matches_float64_reference(B, T, H, D):
    _check(B, T, H, D, torch.float32, "cuda", "qkv_slice")


@needs_cuda
def test_gpu_inplace_matches_out_of_place():
    x = _x(2, 65, 8, 128, torch.bfloat16, "cuda", "qkv_slice")
    cos, sin = rotary_tables(65, 128, 10000.0, "cuda")
    want = apply_rotary(x, cos, sin)
    got = apply_rotary(x.clone(), cos, sin, inplace=True)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
