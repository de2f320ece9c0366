"""Fused RMSNorm with an optional residual add (Zhang & Sennrich 2019), CUDA kernel or CPU twin.

    h = x + residual          (the new residual stream; h = x without a residual)
    y = h * rsqrt(mean(h^2) + eps) * weight

In a pre-norm block ``h = x + attn(norm(x)); y = ffn_norm(h)`` the add and the norm read and write the
(B, T, dim) activations once instead of three times, and the backward adds the gradient arriving
through the residual stream in the same pass. Kernels: ``csrc/cuda/rms_norm.cu`` (one block per row,
16-byte loads, dweight from per-block partials reduced by a second kernel) and its CPU twin
``csrc/cpu/rms_norm.cpp``; math and layout in ``csrc/include/llmsys/rms_norm.h``.

Matches ``llmsys.models.transformer.RMSNorm`` up to rounding: statistics in fp32, the output in x's
dtype (the model rounds ``normed`` to x's dtype before the weight product; we round once, after it).
weight may be x's dtype or fp32 (fp32 master weights); its gradient comes back in its own dtype.
Limits: x is (..., dim), float32/float16/bfloat16, any number of rows; non-contiguous inputs are copied.
"""
from __future__ import annotations

from typing import Optional

import torch

from llmsys.kernels._ext import load_extension

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                 residual: Optional[torch.Tensor] = None):
    """Pure PyTorch, the model's ``RMSNorm`` (plus the residual add): y, or (y, x + residual)."""
    h = x if residual is None else x + residual
    h32 = h.float() if h.dtype != torch.float64 else h
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    y = normed.type_as(h) * weight
    return y if residual is None else (y, h)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor]) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"rms_norm: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"rms_norm: x must be (..., dim) with dim >= 1, got {tuple(x.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must be ({x.shape[-1]},), got {tuple(weight.shape)}")
    if weight.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"rms_norm: weight must be {x.dtype} or float32, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device}, x on {x.device}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device):
        raise ValueError(f"rms_norm: residual must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), got "
                         f"({tuple(residual.shape)}, {residual.dtype}, {residual.device})")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"rms_norm: no kernel for device {x.device}")


def _backward(grad_y, grad_h, h, weight, rstd, ctx):
    grad_y = grad_y if grad_y is not None else torch.zeros_like(h)
    dh, dweight = torch.ops.llmsys.rms_norm_bwd(grad_y.contiguous(), h, weight, rstd,
                                                None if grad_h is None else grad_h.contiguous())
    return dh, (dweight if ctx.needs_input_grad[1] else None)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x = x.contiguous()
        y, rstd, _ = torch.ops.llmsys.rms_norm_fwd(x, weight, eps, None)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = _backward(grad_y, None, x, weight, rstd, ctx)
        return dx, dweight, None


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        y, rstd, h = torch.ops.llmsys.rms_norm_fwd(x.contiguous(), weight, eps, residual.contiguous())
        ctx.save_for_backward(h, weight, rstd)
        ctx.set_materialize_grads(False)  # an unused residual output costs no zero-filled gradient
        return y, h

    @staticmethod
    def backward(ctx, grad_y, grad_h):
        h, weight, rstd = ctx.saved_tensors
        # d(x + residual)/dx = d/dresidual = identity: both get dh, which includes grad_h.
        dh, dweight = _backward(grad_y, grad_h, h, weight, rstd, ctx)
        return dh, dweight, dh, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: Optional[torch.Tensor] = None):
    """RMSNorm of x (..., dim), or of x + residual: returns y, or (y, x + residual) with a residual."""
    _check(x, weight, residual)
    module = load_extension()
    if x.is_cuda and not getattr(module, "with_cuda", False):
        raise ValueError("rms_norm: x is on CUDA but llmsys's extension was built without CUDA kernels "
                         "(see llmsys.kernels._ext); use model.norm=torch")
    if residual is None:
        return _RMSNorm.apply(x, weight, float(eps))
    return _AddRMSNorm.apply(x, weight, residual, float(eps))
