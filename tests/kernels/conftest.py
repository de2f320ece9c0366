"""Kernel tests run on the CPU under Triton's interpreter; it must be on before the kernels are decorated."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
