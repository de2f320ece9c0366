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
            item.add_marker(pytest.mark.timeout(1800))


# -- a trained pretrain -> sft chain, built once per session (llmsys.pipeline), for tests that need one --------

# Small enough to build in ~2 minutes on 2 loaded CPU cores, large enough that SFT visibly works: the base
# never ends its turn on held-out prompts, the SFT model does in most answers (tests/test_pipeline.py).
PIPELINE_OVERRIDES = [
    "model.dim=128", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=256",
    "model.max_seq_len=128", "data.seq_len=128", "data.bpe_vocab_size=512", "logger.progress=false",
    "trainer.global_batch_size=8", "trainer.micro_batch_size=8", "trainer.eval_samples=16", "trainer.log_every=10",
    "pretrain:trainer.max_steps=200", "sft:trainer.max_steps=300",
    "reward:trainer.max_steps=60", "reward:trainer.eval_every=30", "reward:trainer.eval_samples=128",
    "reward:optim.lr=5e-4",
    "dpo:trainer.max_steps=40", "dpo:trainer.eval_every=40", "dpo:trainer.eval_samples=64",
    "ppo:trainer.max_steps=15", "ppo:ppo.max_new_tokens=24", "ppo:ppo.log_samples=4",
]


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory) -> Path:
    """``python -m llmsys.pipeline`` (pretrain -> sft -> reward -> dpo, ppo + report) on a small model; its
    output directory."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("pip install --no-deps chatterbot-corpus (the embedded SFT data)")
    out = tmp_path_factory.mktemp("pipeline")
    # One thread: on a shared 2-core machine OpenMP threads that spin-wait make every step ~10x slower.
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "llmsys.pipeline", "--out", str(out), *PIPELINE_OVERRIDES]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=1500)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-8000:]}")
    return out


@pytest.fixture(scope="session")
def base_export(pipeline_run) -> Path:
    """The pre-trained (base) export of the session's small pipeline: ``<run>/pretrain/final``."""
    return pipeline_run / "pretrain" / "final"


@pytest.fixture(scope="session")
def sft_export(pipeline_run) -> Path:
    """The SFT export of the session's small pipeline, fine-tuned from ``base_export``: ``<run>/sft/final``."""
    return pipeline_run / "sft" / "final"
