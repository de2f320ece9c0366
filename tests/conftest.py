"""Shared test setup: caches under one per-session directory, never the home directory."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Reuse one cache across the whole run (and across runs, when the caller sets LLMSYS_HOME, as .ci/run does):
# DeepSpeed's CPU comm op takes ~1 min to build the first time.
os.environ.setdefault("LLMSYS_HOME", str(REPO / ".cache" / "llmsys"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(os.environ["LLMSYS_HOME"]) / "torch_extensions"))
os.environ.setdefault("HF_HOME", str(Path(os.environ["LLMSYS_HOME"]) / "hf"))
os.environ.setdefault("WANDB_MODE", "offline")


def pytest_collection_modifyitems(config, items):
    # Slow tests stay in CI (they prove multi-process ZeRO and resume) but can be deselected locally
    # with -m "not slow".
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(pytest.mark.timeout(900))
