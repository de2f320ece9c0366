"""The C++/CUDA extension: it builds and loads with its ops, a failed build is reported usefully, the
kernel files stay free of torch, and every csrc/cuda/*.cu compiles for sm_90 with nvcc on its own."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from llmsys.kernels import _ext

CSRC = _ext.csrc_dir()
CUDA_FILES = sorted((CSRC / "cuda").glob("*.cu"))
OUR_OPS = {"rms_norm_fwd", "rms_norm_bwd", "apply_rotary", "apply_rotary_", "swiglu_fwd", "swiglu_bwd",
           "decode_attention", "decode_attention_num_splits"}
# What torch.utils.cpp_extension passes to nvcc: the kernels must build under these too.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
NVCC_TIMEOUT_S = 300


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("nvcc")
    if found is None and CUDA_HOME and Path(CUDA_HOME, "bin", "nvcc").is_file():
        found = str(Path(CUDA_HOME, "bin", "nvcc"))
    return found


def test_extension_builds_and_registers_ops():
    module = _ext.load_extension()
    assert module.__name__ in (_ext.EXT_NAME, "llmsys._C")
    assert _ext.load_extension() is module  # cached in-process
    assert OUR_OPS <= set(_ext.registered_ops())
    for name in OUR_OPS:
        assert hasattr(torch.ops.llmsys, name)
    assert module.with_cuda == (torch.cuda.is_available() and _ext.cuda_build_possible())


def test_sources_and_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSYS_HOME", str(tmp_path))
    assert _ext.build_directory() == tmp_path / "torch_extensions" / _ext.EXT_NAME
    cpu_only = {p.name for p in _ext.sources(CSRC, with_cuda=False)}
    assert {"bindings.cpp", "bind_rms_norm.cpp", "rms_norm.cpp", "rotary.cpp", "swiglu.cpp"} <= cpu_only
    assert not any(name.endswith(".cu") for name in cpu_only)
    with_cuda = {p.name for p in _ext.sources(CSRC, with_cuda=True)}
    assert {"rms_norm.cu", "rotary.cu", "swiglu.cu"} <= with_cuda


def test_build_failure_names_the_error_and_the_fallback(monkeypatch):
    from torch.utils import cpp_extension

    def failing_load(**kwargs):
        raise RuntimeError("Error building extension 'llmsys_C': csrc/cpu/rms_norm.cpp:1: error: boom")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    monkeypatch.setattr(_ext, "_module", None)
    with pytest.raises(RuntimeError, match="model.norm=torch") as info:
        _ext.load_extension()
    assert "error: boom" in str(info.value)


def test_only_bindings_include_torch():
    torch_include = re.compile(r'#\s*include\s*[<"](torch|ATen|c10|pybind11)/')
    for path in sorted(CSRC.rglob("*")):
        if path.suffix not in (".cpp", ".cu", ".h", ".cuh") or path.name.startswith("bind"):
            continue
        assert not torch_include.search(path.read_text()), f"{path} includes torch headers"


@pytest.mark.parametrize("cu", CUDA_FILES or [None], ids=[p.name for p in CUDA_FILES] or ["none"])
def test_nvcc_compiles_cuda_file_for_sm90(cu, tmp_path):
    if cu is None:
        pytest.skip("no csrc/cuda/*.cu files")
    nvcc = _nvcc()
    if nvcc is None:
        reason = "nvcc not found (not on PATH, no $CUDA_HOME/bin/nvcc): the CUDA compile check needs the CUDA toolkit"
        print(reason)
        pytest.skip(reason)
    cmd = [nvcc, "-arch=sm_90", "-std=c++17", "-O3", "-c", f"-I{CSRC / 'include'}", "-DLLMSYS_WITH_CUDA",
           *TORCH_NVCC_DEFINES, str(cu), "-o", str(tmp_path / (cu.stem + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S,
                          env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / (cu.stem + ".o")).stat().st_size > 0
    if proc.stderr.strip():
        print(proc.stderr)  # warnings, shown with -s
