"""Fused kernels, one op per file: Triton kernels, launcher, autograd.Function, public function, ``*_ref``.

Triton needs a GPU; on a CPU-only machine the kernels run under Triton's interpreter, which must be
switched on before any ``@triton.jit`` function is defined. Importing this package does that
(``TRITON_INTERPRET=1``) when no CUDA device is visible and the user has not chosen otherwise, so
``model.attention=triton`` works on a laptop, slowly, with the same numbers.
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton.language" in sys.modules:
        # Triton's own library functions were already defined for compilation (by whoever imported
        # triton first, e.g. DeepSpeed); the interpreter cannot run them. Refuse rather than crash later.
        raise RuntimeError("no CUDA device, so llmsys's Triton kernels need Triton's interpreter, but triton was "
                           "imported before TRITON_INTERPRET=1 was set; export TRITON_INTERPRET=1, or import "
                           "llmsys.kernels (or call llmsys.distributed.setup_environment) before triton")
    os.environ["TRITON_INTERPRET"] = "1"

# Eager imports on purpose: a module and its public function share a name (flash_attention), and
# binding the function here, after the submodule import, keeps `from llmsys.kernels import
# flash_attention` the function however the submodule was first imported.
from llmsys.kernels.cross_entropy import (  # noqa: E402
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_ref,
    linear_logprobs,
    linear_logprobs_ref,
)
from llmsys.kernels.flash_attention import flash_attention, flash_attention_ref  # noqa: E402

__all__ = [
    "flash_attention", "flash_attention_ref", "fused_linear_cross_entropy", "fused_linear_cross_entropy_ref",
    "linear_logprobs", "linear_logprobs_ref",
]
