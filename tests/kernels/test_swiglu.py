"""llmsys.kernels.swiglu (the CPU twin here, the CUDA kernel in the test_gpu_* tests) against swiglu_ref.

fp32 tightly against float64; fp16/bf16 within 2x PyTorch's own error in the input dtype.
"""
from __future__ import annotations

import pytest
import torch

from llmsys.kernels.swiglu import swiglu, swiglu_ref

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(3 * torch.randn(shape, generator=gen)).to(device, dtype) for _ in range(3)]  # gate, up, grad


def _run(fn, gate, up, grad, dtype=None):
    def cast(t):
        return (t.detach().clone() if dtype is None else t.detach().to(dtype)).requires_grad_()

    g, u = cast(gate), cast(up)
    out = fn(g, u)
    out.backward(grad.to(out.dtype))
    return [out.detach(), g.grad, u.grad]


def _check(shape, dtype, device, transpose=False):
    gate, up, grad = _inputs(shape, dtype, device)
    if transpose:
        gate, up = gate.transpose(0, -1), up.transpose(0, -1)
        grad = grad.transpose(0, -1)
    got = _run(swiglu, gate, up, grad)
    exact = _run(swiglu_ref, gate, up, grad, torch.float64)
    assert got[0].dtype == dtype
    if dtype == torch.float32:
        for g, t in zip(got, exact):
            torch.testing.assert_close(g.double(), t, atol=1e-5, rtol=1e-5)
        return
    lowp = _run(swiglu_ref, gate, up, grad)
    for name, g, p, t in zip(("out", "dgate", "dup"), got, lowp, exact):
        ours, theirs = (g.double() - t).abs().max().item(), (p.double() - t).abs().max().item()
        assert ours <= 2 * theirs + 1e-6, f"{name}: kernel error {ours:.3e} > 2 x PyTorch's {theirs:.3e}"


SHAPES = [(1,), (7,), (17, 4099), (3, 5, 11)]


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_float64_reference(shape):
    _check(shape, torch.float32, "cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_low_precision_within_torch_error(shape, dtype):
    _check(shape, dtype, "cpu")


def test_non_contiguous_inputs():
    _check((6, 9, 13), torch.float32, "cpu", transpose=True)


def test_matches_model_feedforward():
    from llmsys.config import ModelConfig
    from llmsys.models.transformer import FeedForward

    torch.manual_seed(0)
    ffn = FeedForward(ModelConfig(dim=32, ffn_dim=88, n_layers=2, n_heads=2))  # mlp=torch: the model's own math
    x = torch.randn(2, 5, 32)
    fused = ffn.w2(swiglu(ffn.w1(x), ffn.w3(x)))
    torch.testing.assert_close(fused, ffn(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("gate, up, match", [
    (torch.randn(4, 8), torch.randn(4, 9), "up must match"),
    (torch.randn(4, 8), torch.randn(4, 8, dtype=torch.bfloat16), "up must match"),
    (torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64), "float32, float16 or bfloat16"),
])
def test_refuses_bad_inputs(gate, up, match):
    with pytest.raises(ValueError, match=match):
        swiglu(gate, up)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES + [(4096, 11008), (3, 1000003)])
def test_gpu_low_precision_within_torch_error(shape, dtype):
    _check(shape, dtype, "cuda")


@needs_cuda
@pytest.mark.parametrize("shape", SHAPES)
def test_gpu_fp32_matches_float64_reference(shape):
    _check(shape, torch.float32, "cuda")


@needs_cuda
def test_gpu_misaligned_view():
    gate, up, grad = _inputs((4097,), torch.bfloat16, "cuda")
    _run(swiglu, gate[1:], up[1:], grad[1:])  # 2-byte offset: the scalar path
    _check((4096,), torch.bfloat16, "cuda")
    got = swiglu(gate[1:], up[1:])
    torch.testing.assert_close(got.float(), swiglu_ref(gate[1:].float(), up[1:].float()), atol=2e-2, rtol=2e-2)
