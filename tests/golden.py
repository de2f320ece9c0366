"""Golden training curves: short fp32 runs of every stage on the tiny default, recorded in ``tests/assets/losses``.

A refactor must not move a number. These runs chain the stages the way the pipeline does (pretrain ->
SFT -> reward, DPO and PPO from the SFT export, PPO against the reward export), each as its own
``python -m llmsys.train`` process with one OpenMP thread (single-threaded fp32 CPU arithmetic is
reproducible run to run), and keep every logged metric that does not measure time.

    python -m tests.golden --record        # (re)write tests/assets/losses/*.json from the current code
    python -m tests.golden --out DIR       # run the chain into DIR and compare with the assets

``tests/test_golden.py`` runs the comparison in CI. Recording is for a behaviour change only, in its own
commit that says what changed and why.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets" / "losses"

# The tiny default (model=tiny, its 4k BPE, the embedded data), fp32, small batches so that the whole
# chain takes a few minutes on 2 CPU cores.
COMMON = ["trainer.precision=fp32", "trainer.log_every=1", "trainer.global_batch_size=8",
          "trainer.micro_batch_size=4", "trainer.eval_samples=16", "trainer.save_every=0", "logger.progress=false",
          "trainer.resume=auto"]

# stage -> (overrides, the stages whose exports it reads)
CHAIN: dict[str, list[str]] = {
    "pretrain": ["stage=pretrain", "data=shakespeare", "trainer.max_steps=20", "trainer.eval_every=10",
                 "optim.warmup_steps=5"],
    "sft": ["stage=sft", "data=chat", "trainer.max_steps=20", "trainer.eval_every=10", "optim.warmup_steps=5",
            "model.init_from={out}/pretrain/final"],
    "reward": ["stage=reward", "data=prefs", "trainer.max_steps=20", "trainer.eval_every=10", "optim.lr=3e-4",
               "optim.warmup_steps=5", "model.init_from={out}/sft/final"],
    "dpo": ["stage=dpo", "data=prefs", "trainer.max_steps=20", "trainer.eval_every=10", "optim.lr=1e-4",
            "optim.warmup_steps=5", "dpo.beta=0.5", "dpo.nll_weight=1.0", "model.init_from={out}/sft/final"],
    "ppo": ["stage=ppo", "data=prefs", "trainer.max_steps=4", "optim.lr=2e-4", "optim.warmup_steps=2",
            "ppo.rollout_batch_size=16", "ppo.max_new_tokens=16", "ppo.adaptive_kl=true", "ppo.init_kl_coef=0.2",
            "model.init_from={out}/sft/final", "ppo.reward_model={out}/reward/final"],
}

# Keys that measure wall-clock time or speed, never compared.
TIMING_KEYS = frozenset({"tokens_per_sec", "tokens_per_sec_per_device", "mfu", "elapsed", "step_time",
                         "generation_time", "score_time", "train_time", "seconds"})
RTOL = 1e-6
ATOL = 1e-9


def run_chain(out: Path, stages: list[str] | None = None) -> dict[str, list[dict]]:
    """Train every stage of ``CHAIN`` into ``out/<stage>``; the recorded rows of each."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    curves = {}
    for stage in stages or list(CHAIN):
        overrides = [o.format(out=out) for o in CHAIN[stage]]
        cmd = [sys.executable, "-m", "llmsys.train", f"trainer.output_dir={out / stage}", *COMMON, *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stderr\n{proc.stderr[-6000:]}")
        curves[stage] = curve(out / stage / "metrics.jsonl")
    return curves


def curve(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def differences(stage: str, expected: list[dict], got: list[dict]) -> list[str]:
    """Human-readable mismatches between two curves (empty when they agree)."""
    problems = []
    if len(expected) != len(got):
        problems.append(f"{stage}: {len(got)} metric rows, expected {len(expected)}")
    for want, have in zip(expected, got):
        step = want.get("step")
        if set(want) != set(have):
            problems.append(f"{stage} step {step}: keys {sorted(set(have) ^ set(want))} differ")
        for key, value in want.items():
            other = have.get(key)
            if isinstance(value, (int, float)) and isinstance(other, (int, float)) and value is not None:
                if not math.isclose(value, other, rel_tol=RTOL, abs_tol=ATOL):
                    problems.append(f"{stage} step {step}: {key} = {other!r}, golden {value!r}")
            elif value != other:
                problems.append(f"{stage} step {step}: {key} = {other!r}, golden {value!r}")
    return problems


PIPELINE_ASSET = ASSETS.parent / "pipeline_small.json"


def pipeline_numbers(report: dict) -> list[dict]:
    """What the small pipeline (tests/conftest.py's ``pipeline_run``) measured, per stage: its metrics and
    its probes' numbers and answers, as rows that :func:`differences` compares."""
    rows = []
    for name, entry in report["stages"].items():
        row = {"step": name, **{f"metrics.{k}": v for k, v in entry["metrics"].items()}}
        for probe, result in entry["probes"].items():
            row.update({f"{probe}.{k}": v for k, v in result.items() if k != "samples"})
            row.update({f"{probe}.answer{i}": s["answer"] for i, s in enumerate(result.get("samples", []))})
        rows.append(row)
    return rows


def load_assets() -> dict[str, list[dict]]:
    return {stage: json.loads((ASSETS / f"{stage}.json").read_text()) for stage in CHAIN}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.golden", description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="write the assets from this run")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="llmsys-golden-"))
    curves = run_chain(out.resolve())
    if args.record:
        ASSETS.mkdir(parents=True, exist_ok=True)
        for stage, rows in curves.items():
            (ASSETS / f"{stage}.json").write_text(json.dumps(rows, indent=1) + "\n")
        print(f"recorded {', '.join(curves)} into {ASSETS}")
        return
    expected = load_assets()
    problems = [p for stage in CHAIN for p in differences(stage, expected[stage], curves[stage])]
    print("\n".join(problems) if problems else "golden curves match")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
