"""Rotary position embedding (Su et al. 2021), GPT-NeoX / Llama half layout, CUDA kernel or CPU twin.

x is (B, T, H, D); element i of each head is rotated with element i + D/2 by the angle of position t
and frequency i (cos, sin: (T, D/2) fp32 from ``llmsys.models.transformer.rotary_tables``, or indexed
by packed positions). The backward is the rotation by -theta, so it needs only cos and sin, never x.

One read and one write of x, no (B, T, H, D/2) fp32 temporaries as the eager version makes. Kernels:
``csrc/cuda/rotary.cu`` (one block per token, 16-byte loads of both halves) and its CPU twin
``csrc/cpu/rotary.cpp``; layout in ``csrc/include/llmsys/rotary.h``.

Strides: x may be strided over (B, T, H) (q and k views of a fused projection) with a contiguous last
dimension; nothing is copied. ``inplace=True`` writes the result into x itself (and returns x): legal
for autograd because the backward does not need x, and refused for tensors whose elements overlap
(expand()ed). The output of ``inplace=False`` is a new contiguous tensor.
Matches ``llmsys.models.transformer.apply_rotary``: fp32 math, output rounded to x's dtype.
"""
from __future__ import annotations

import torch

from llmsys.kernels._ext import load_extension

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pure PyTorch, the model's ``apply_rotary``: fp32 math (fp64 for fp64 inputs), cast back to x's dtype."""
    half = x.shape[-1] // 2
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x1, x2 = x[..., :half].to(compute), x[..., half:].to(compute)
    cos = cos.to(compute)[None, :, None, :]
    sin = sin.to(compute)[None, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"apply_rotary: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"apply_rotary: x must be (B, T, H, D), got {tuple(x.shape)}")
    B, T, H, D = x.shape
    if D % 2 != 0 or D == 0:
        raise ValueError(f"apply_rotary: head dim D must be even and > 0, got {D}")
    if x.stride(-1) != 1:
        raise ValueError(f"apply_rotary: x's last dimension must be contiguous, strides {x.stride()}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dtype != torch.float32:
            raise ValueError(f"apply_rotary: {name} must be float32, got {table.dtype}")
        if tuple(table.shape) != (T, D // 2):
            raise ValueError(f"apply_rotary: {name} must be (T, D/2) = ({T}, {D // 2}), got {tuple(table.shape)}")
        if table.device != x.device:
            raise ValueError(f"apply_rotary: {name} is on {table.device}, x on {x.device}")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"apply_rotary: no kernel for device {x.device}")


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return torch.ops.llmsys.apply_rotary(x, cos, sin, False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return torch.ops.llmsys.apply_rotary(_last_dim_contiguous(grad), cos, sin, True), None, None


class _RotaryInplace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        torch.ops.llmsys.apply_rotary_(x, cos, sin, False)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return torch.ops.llmsys.apply_rotary(_last_dim_contiguous(grad), cos, sin, True), None, None


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Rotate x (B, T, H, D) by position (cos, sin: (T, D/2) fp32); with ``inplace`` x is overwritten and returned."""
    _check(x, cos, sin)
    module = load_extension()
    if x.is_cuda and not getattr(module, "with_cuda", False):
        raise ValueError("apply_rotary: x is on CUDA but llmsys's extension was built without CUDA kernels "
                         "(see llmsys.kernels._ext); use model.rope=torch")
    cos, sin = cos.contiguous(), sin.contiguous()
    return (_RotaryInplace if inplace else _Rotary).apply(x, cos, sin)
