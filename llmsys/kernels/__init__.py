"""Fused kernels, one op per file: kernels, launcher, autograd.Function, public function, ``*_ref``.

Triton ops: flash_attention, fused_linear_cross_entropy, linear_logprobs. C++/CUDA ops of ``csrc/``
(``llmsys._C``, built on first use by ``_ext.py``; CPU twins where there is no GPU): rms_norm,
apply_rotary, swiglu, decode_attention.

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
from llmsys.kernels.decode_attention import (  # noqa: E402
    decode_attention,
    decode_attention_num_splits,
    decode_attention_ref,
)
from llmsys.kernels.flash_attention import flash_attention, flash_attention_ref  # noqa: E402
from llmsys.kernels.rms_norm import rms_norm, rms_norm_ref  # noqa: E402
from llmsys.kernels.rotary import apply_rotary, apply_rotary_ref  # noqa: E402
from llmsys.kernels.swiglu import swiglu, swiglu_ref  # noqa: E402

__all__ = [
    "apply_rotary", "apply_rotary_ref", "rms_norm", "rms_norm_ref", "swiglu", "swiglu_ref",
    "decode_attention", "decode_attention_num_splits", "decode_attention_ref",
    "flash_attention", "flash_attention_ref", "fused_linear_cross_entropy", "fused_linear_cross_entropy_ref",
    "linear_logprobs", "linear_logprobs_ref",
]
