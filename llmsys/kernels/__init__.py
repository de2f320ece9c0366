"""Fused kernels, one op per file: Triton kernels, launcher, autograd.Function, public function, ``*_ref``.

Triton needs a GPU; on a CPU-only machine the kernels run under Triton's interpreter, which must be
switched on before any ``@triton.jit`` function is defined. Importing this package does that
(``TRITON_INTERPRET=1``) when no CUDA device is visible and the user has not chosen otherwise, so
``model.attention=triton`` works on a laptop, slowly, with the same numbers.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_EXPORTS = {
    "flash_attention": "llmsys.kernels.flash_attention",
    "flash_attention_ref": "llmsys.kernels.flash_attention",
    "fused_linear_cross_entropy": "llmsys.kernels.cross_entropy",
    "fused_linear_cross_entropy_ref": "llmsys.kernels.cross_entropy",
    "linear_logprobs": "llmsys.kernels.cross_entropy",
    "linear_logprobs_ref": "llmsys.kernels.cross_entropy",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Each op's module (and Triton with it) is imported on first use, so `import llmsys.kernels`
    # is cheap and one op's import problem never hides the others.
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llmsys.kernels' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
