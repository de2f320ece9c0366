"""Build and load ``llmsys._C``, the C++/CUDA ops of ``csrc/``, and register them as ``torch.ops.llmsys.*``.

What gets built: ``csrc/*.cpp`` (the per-op bindings, the only code that sees torch) and
``csrc/cpu/*.cpp`` (the CPU twins) always; ``csrc/cuda/*.cu`` as well when this torch has CUDA, a GPU
is visible and ``nvcc`` is found (``CUDA_HOME``); then ``-DLLMSYS_WITH_CUDA`` switches the CUDA
dispatch on and ``torch.utils.cpp_extension`` picks ``-gencode`` flags for the visible GPUs (or for
``$TORCH_CUDA_ARCH_LIST`` when set). Ops register themselves (``TORCH_LIBRARY_FRAGMENT`` in each
``csrc/bind_<op>.cpp``), so adding an op means adding files, not editing a list here.

How (like DeepSpeed's op builders):

* Just in time, on first use: ``load_extension()`` compiles with ``torch.utils.cpp_extension.load``
  into ``$LLMSYS_HOME/torch_extensions/llmsys_C`` (``~/.cache/llmsys`` by default). ninja rebuilds
  only what changed; torch re-keys the module when sources or flags change. Measured on 2 CPU cores:
  ~60-70 s cold, ~1-3 s when cached. Concurrent processes wait on torch's lock file in that directory.
* Ahead of time: ``python -m llmsys.kernels._ext`` builds the same cache and prints where (CI does
  this once before the tests), or ``LLMSYS_BUILD_EXT=1 pip install --no-build-isolation .`` compiles
  the real ``llmsys._C`` module with setuptools (``setup_extension()`` below gives setup.py the
  Extension); ``load_extension()`` then imports ``llmsys._C`` and builds nothing.

A failed build raises ``RuntimeError`` with the tail of the compiler output and names the config
switches (``model.norm=torch`` ...) that select the pure-PyTorch ops instead.
"""
from __future__ import annotations

import importlib
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

from llmsys.paths import torch_extensions_home

EXT_NAME = "llmsys_C"
# Set to 1 at install time (setup.py compiles llmsys._C) or in CI (prebuild the JIT cache).
BUILD_ENV = "LLMSYS_BUILD_EXT"
FALLBACK_HINT = ("select the PyTorch implementations instead with model.norm=torch model.rope=torch "
                 "model.mlp=torch")

CXX_FLAGS = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
LD_FLAGS = ["-fopenmp"]
# No --use_fast_math: the kernels are memory bound, and exact expf/rsqrtf keep the GPU within the
# CPU twin's error.
NVCC_FLAGS = ["-O3", "-lineinfo", "-DLLMSYS_WITH_CUDA"]
ERROR_TAIL_CHARS = 6000

_lock = threading.Lock()
_module: ModuleType | None = None


def csrc_dir() -> Path:
    """``csrc/`` of a source checkout (repo root), or the copy an installed package ships as ``llmsys/csrc``."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "csrc", package / "csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    raise RuntimeError(f"llmsys C++ sources not found (looked for csrc/bindings.cpp next to {package}); "
                       f"reinstall llmsys with its csrc/ package data, or {FALLBACK_HINT}")


def cuda_build_possible() -> bool:
    """True when the CUDA kernels can be built here: CUDA torch, a visible GPU and nvcc."""
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and torch.cuda.is_available() and CUDA_HOME is not None


def sources(root: Path, with_cuda: bool) -> list[Path]:
    found = sorted(root.glob("*.cpp")) + sorted((root / "cpu").glob("*.cpp"))
    if with_cuda:
        found += sorted((root / "cuda").glob("*.cu"))
    return found


def build_directory() -> Path:
    path = torch_extensions_home() / EXT_NAME
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build(verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension

    root = csrc_dir()
    with_cuda = cuda_build_possible()
    defines = ["-DLLMSYS_WITH_CUDA"] if with_cuda else []
    try:
        return cpp_extension.load(
            name=EXT_NAME,
            sources=[str(p) for p in sources(root, with_cuda)],
            extra_include_paths=[str(root / "include")],
            extra_cflags=CXX_FLAGS + defines,
            extra_cuda_cflags=NVCC_FLAGS,
            extra_ldflags=LD_FLAGS,
            build_directory=str(build_directory()),
            with_cuda=with_cuda,
            verbose=verbose,
        )
    except (RuntimeError, OSError, ImportError) as err:
        log = str(err)
        if len(log) > ERROR_TAIL_CHARS:
            log = "...\n" + log[-ERROR_TAIL_CHARS:]
        raise RuntimeError(f"building llmsys's C++/CUDA extension {EXT_NAME} from {root} failed "
                           f"(cache {build_directory()}); {FALLBACK_HINT}.\nBuild output (tail):\n{log}") from err


def load_extension(verbose: bool = False) -> ModuleType:
    """The loaded extension module (built on first call, cached in-process); its ops are in torch.ops.llmsys."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            try:
                module = importlib.import_module("llmsys._C")  # pre-built by LLMSYS_BUILD_EXT=1 pip install
            except ImportError:
                module = _build(verbose)
            if torch.cuda.is_available() and not getattr(module, "with_cuda", False):
                # CPU ops still work; CUDA tensors will be refused by the Python wrappers with this reason.
                print(f"llmsys: {module.__name__} was built without CUDA kernels "
                      f"(torch.version.cuda={torch.version.cuda}, nvcc found: {cuda_build_possible()})",
                      file=sys.stderr)
            _module = module
    return _module


def registered_ops() -> list[str]:
    """Names of the ops registered under torch.ops.llmsys (after load_extension())."""
    return sorted(s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("llmsys::"))


def has_cuda_kernels() -> bool:
    return bool(getattr(load_extension(), "with_cuda", False))


def setup_extension(root: Path):
    """The setuptools Extension for ``llmsys._C`` (``LLMSYS_BUILD_EXT=1`` installs); paths relative to ``root``.

    Builds the CUDA kernels when this torch has CUDA and nvcc is found (no GPU needed: set
    ``TORCH_CUDA_ARCH_LIST``), else the CPU twins only.
    """
    from torch.utils import cpp_extension

    csrc = root / "csrc"
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    rel = [str(p.relative_to(root)) for p in sources(csrc, with_cuda)]
    defines = ["-DLLMSYS_WITH_CUDA"] if with_cuda else []
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    return kind(
        name="llmsys._C", sources=rel, include_dirs=[str(csrc / "include")],
        extra_compile_args={"cxx": CXX_FLAGS + defines, "nvcc": NVCC_FLAGS}, extra_link_args=LD_FLAGS,
    )


def main() -> None:
    import time

    t0 = time.perf_counter()
    module = load_extension(verbose=os.environ.get("VERBOSE") == "1")
    ops = registered_ops()
    print(f"{module.__name__}: {module.__file__}\n  cache: {build_directory()}\n  with CUDA kernels: "
          f"{getattr(module, 'with_cuda', False)}\n  ops: {', '.join(ops)}\n  took {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
