"""SwiGLU gate (Shazeer 2020): ``silu(gate) * up``, CUDA kernel or CPU twin.

The Llama MLP is ``w2(silu(w1 x) * w3 x)``; fusing the activation and the product reads gate and up
once and writes one output (eager PyTorch also writes and re-reads silu(gate)), and the backward
recomputes sigmoid(gate) instead of saving it: forward moves 3 elements per output, backward 5.
Kernels: ``csrc/cuda/swiglu.cu`` (16-byte vectorised grid-stride loop) and its CPU twin
``csrc/cpu/swiglu.cpp``; math in ``csrc/include/llmsys/swiglu.h``.

Matches ``llmsys.models.transformer.FeedForward``'s ``F.silu(a) * b`` up to rounding: fp32 math and one
rounding per output (eager rounds silu(gate) to the input dtype first). Any shape; gate and up must
match in shape, dtype and device; non-contiguous inputs are copied.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmsys.kernels._ext import load_extension

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Pure PyTorch, as the model's FeedForward computes it."""
    return F.silu(gate) * up


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"swiglu: gate must be float32, float16 or bfloat16, got {gate.dtype}")
    if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
        raise ValueError(f"swiglu: up must match gate ({tuple(gate.shape)}, {gate.dtype}, {gate.device}), got "
                         f"({tuple(up.shape)}, {up.dtype}, {up.device})")
    if gate.device.type not in ("cpu", "cuda"):
        raise ValueError(f"swiglu: no kernel for device {gate.device}")


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return torch.ops.llmsys.swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        dgate, dup = torch.ops.llmsys.swiglu_bwd(grad.contiguous(), gate, up)
        return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise, with a fused backward."""
    _check(gate, up)
    module = load_extension()
    if gate.is_cuda and not getattr(module, "with_cuda", False):
        raise ValueError("swiglu: inputs are on CUDA but llmsys's extension was built without CUDA kernels "
                         "(see llmsys.kernels._ext); use model.mlp=torch")
    return _SwiGLU.apply(gate, up)
