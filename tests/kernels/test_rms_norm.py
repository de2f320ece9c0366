"""llmsys.kernels.rms_norm (the CPU twin here, the CUDA kernel in the test_gpu_* tests) against rms_norm_ref.

fp32 is checked tightly against the float64 reference; fp16/bf16 are judged against PyTorch's own error:
the kernel's max error versus the float64 reference (on the same low-precision inputs) must stay within
2x that of the reference run in the input dtype, plus a small floor.
"""
from __future__ import annotations

import pytest
import torch

from llmsys.kernels.rms_norm import rms_norm, rms_norm_ref

EPS = 1e-6
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(rows, cols, dtype, device, residual, weight_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen).to(device, dtype)
    w = (1 + 0.5 * torch.randn(cols, generator=gen)).to(device, weight_dtype or dtype)
    r = torch.randn(rows, cols, generator=gen).to(device, dtype) if residual else None
    dy = torch.randn(rows, cols, generator=gen).to(device, dtype)
    dh = torch.randn(rows, cols, generator=gen).to(device, dtype) if residual else None
    return x, w, r, dy, dh


def _run(fn, x, w, r, dy, dh, dtype=None):
    """Outputs and gradients [y, (h,) dx, dw, (dr,)] of fn on leaf copies of the inputs cast to dtype."""
    def cast(t):
        return t.detach().clone() if dtype is None else t.detach().to(dtype)

    xs, ws = cast(x).requires_grad_(), cast(w).requires_grad_()
    rs = cast(r).requires_grad_() if r is not None else None
    out = fn(xs, ws, EPS, rs)
    if r is None:
        torch.autograd.backward([out], [cast(dy).to(out.dtype)])
        return [out.detach(), xs.grad, ws.grad]
    y, h = out
    torch.autograd.backward([y, h], [cast(dy).to(y.dtype), cast(dh)])
    return [y.detach(), h.detach(), xs.grad, ws.grad, rs.grad]


def _assert_close_fp32(got, want):
    for g, t in zip(got, want):
        scale = max(1.0, t.abs().max().item())
        torch.testing.assert_close(g.double(), t, atol=2e-5 * scale, rtol=1e-5)


def _assert_within_torch_error(got, lowp, exact, names):
    for name, g, p, t in zip(names, got, lowp, exact):
        ours = (g.double() - t).abs().max().item()
        theirs = (p.double() - t).abs().max().item()
        floor = 1e-6 * max(1.0, t.abs().max().item())
        assert ours <= 2 * theirs + floor, f"{name}: kernel error {ours:.3e} > 2 x PyTorch's {theirs:.3e}"


@pytest.mark.parametrize("rows", [1, 17, 300])
@pytest.mark.parametrize("cols", [1, 7, 4099])
@pytest.mark.parametrize("residual", [False, True])
def test_fp32_matches_float64_reference(rows, cols, residual):
    x, w, r, dy, dh = _inputs(rows, cols, torch.float32, "cpu", residual)
    got = _run(rms_norm, x, w, r, dy, dh)
    want = _run(rms_norm_ref, x, w, r, dy, dh, torch.float64)
    _assert_close_fp32(got, want)


def _check_low_precision(rows, cols, dtype, residual, device, weight_dtype=None):
    x, w, r, dy, dh = _inputs(rows, cols, dtype, device, residual, weight_dtype)
    got = _run(rms_norm, x, w, r, dy, dh)
    exact = _run(rms_norm_ref, x, w, r, dy, dh, torch.float64)
    # PyTorch in the input dtype (the weight cast too, so its output keeps x's dtype like ours).
    lowp = _run(rms_norm_ref, x, w.to(dtype), r, dy, dh)
    assert got[0].dtype == dtype and got[-2 if residual else -1].dtype == w.dtype
    names = ["y", "h", "dx", "dw", "dres"] if residual else ["y", "dx", "dw"]
    _assert_within_torch_error(got, lowp, exact, names)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,cols", [(1, 1), (17, 7), (300, 4099)])
@pytest.mark.parametrize("residual", [False, True])
def test_low_precision_within_torch_error(rows, cols, dtype, residual):
    _check_low_precision(rows, cols, dtype, residual, "cpu")


def test_fp32_weight_with_bf16_input():
    _check_low_precision(33, 130, torch.bfloat16, True, "cpu", weight_dtype=torch.float32)


def test_leading_dims_and_non_contiguous_input():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 40, 5, generator=gen).transpose(1, 2)  # (3, 5, 40), not contiguous
    w = torch.randn(40, generator=gen)
    torch.testing.assert_close(rms_norm(x, w), rms_norm_ref(x, w), atol=1e-5, rtol=1e-5)


def test_unused_residual_output_gets_no_gradient():
    x, w, r, dy, _ = _inputs(9, 33, torch.float32, "cpu", True)
    xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
    y, _ = rms_norm(xs, w, EPS, rs)
    (y * dy).sum().backward()
    xd, rd = x.double().requires_grad_(), r.double().requires_grad_()
    (rms_norm_ref(xd, w.double(), EPS, rd)[0] * dy.double()).sum().backward()
    torch.testing.assert_close(xs.grad.double(), xd.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rs.grad, xs.grad)


def test_matches_model_rmsnorm():
    from llmsys.models.transformer import RMSNorm

    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 7, 64)
    torch.testing.assert_close(rms_norm(x, norm.weight, 1e-5), norm(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("make, match", [
    (lambda: (torch.randn(4, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64), None), "float32"),
    (lambda: (torch.randn(4, 8), torch.ones(7), None), "weight must be"),
    (lambda: (torch.randn(4, 8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.float16), None), "weight must be"),
    (lambda: (torch.randn(4, 8), torch.ones(8), torch.randn(4, 9)), "residual must match"),
    (lambda: (torch.randn(4, 8), torch.ones(8), torch.randn(4, 8, dtype=torch.bfloat16)), "residual must match"),
    (lambda: (torch.randn(4, 0), torch.ones(0), None), "dim >= 1"),
])
def test_refuses_bad_inputs(make, match):
    x, w, r = make()
    with pytest.raises(ValueError, match=match):
        rms_norm(x, w, EPS, r)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,cols", [(1, 1), (17, 7), (300, 4099), (64, 4096), (8, 16384)])
@pytest.mark.parametrize("residual", [False, True])
def test_gpu_low_precision_within_torch_error(rows, cols, dtype, residual):
    _check_low_precision(rows, cols, dtype, residual, "cuda")


@needs_cuda
@pytest.mark.parametrize("rows,cols", [(17, 7), (300, 4099), (64, 2048)])
@pytest.mark.parametrize("residual", [False, True])
def test_gpu_fp32_matches_float64_reference(rows, cols, residual):
    x, w, r, dy, dh = _inputs(rows, cols, torch.float32, "cuda", residual)
    _assert_close_fp32(_run(rms_norm, x, w, r, dy, dh), _run(rms_norm_ref, x, w, r, dy, dh, torch.float64))


@needs_cuda
def test_gpu_fp32_weight_with_bf16_input():
    _check_low_precision(257, 4096, torch.bfloat16, True, "cuda", weight_dtype=torch.float32)


@needs_cuda
def test_gpu_matches_cpu_twin():
    x, w, r, dy, dh = _inputs(300, 4099, torch.bfloat16, "cpu", True)
    cpu = _run(rms_norm, x, w, r, dy, dh)
    gpu = _run(rms_norm, *(t.cuda() for t in (x, w, r, dy, dh)))
    for c, g in zip(cpu, gpu):
        torch.testing.assert_close(g.cpu(), c, atol=2e-2, rtol=2e-2)
