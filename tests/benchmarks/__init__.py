"""The benchmarks' smoke tests; :func:`run_smoke` starts a benchmark script the way CI does."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def smoke_env(out: Path, **extra: str) -> dict[str, str]:
    """The environment of a smoke run on the CPU: results into ``out``, the checkout importable."""
    env = dict(os.environ, OUT=str(out), PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return env


def run_smoke(script: str, out: Path, timeout: int, *args: str, **env: str) -> tuple[int, str]:
    """Run ``benchmarks/<script> --smoke *args`` from the repo root; (returncode, stdout + stderr)."""
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", "--smoke", *args], cwd=REPO,
                          env=smoke_env(out, **env), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr
