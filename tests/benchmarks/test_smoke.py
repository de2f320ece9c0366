"""The kernel benchmarks and gpu_check.sh run end to end on the CPU (--smoke) and write sane results.

The three runs (attention.py, cross_entropy.py, gpu_check.sh, each with --smoke and OUT pointing to
its own temporary directory) start together in one module fixture and are waited for once: each is
mostly Triton-interpreter time, and running them side by side keeps the file near 40 s on 2 cores.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 300
# The smoke runs are fp32 on tiny shapes: ours vs the fp64 reference stays near fp32 rounding.
MAX_ABS_ERR = 1e-4
STAMP_KEYS = ("device", "torch", "triton", "python", "date", "git_commit")


def _env(out: Path) -> dict[str, str]:
    # PYTHON: the interpreter gpu_check.sh uses (this one, e.g. CI's virtualenv).
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """{name: (returncode, combined output, OUT dir)} for the three smoke runs, started in parallel."""
    commands = {
        "attention": [sys.executable, "benchmarks/attention.py", "--smoke"],
        "cross_entropy": [sys.executable, "benchmarks/cross_entropy.py", "--smoke"],
        "gpu_check": ["bash", "benchmarks/gpu_check.sh", "--smoke"],
    }
    procs = {}
    for name, cmd in commands.items():
        out = tmp_path_factory.mktemp(name)
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=_env(out), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True), out)
    results = {}
    try:
        for name, (proc, out) in procs.items():
            output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
            results[name] = (proc.returncode, output, out)
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _rows(out: Path, subject: str) -> list[dict]:
    files = sorted(out.glob(f"{subject}-*-smoke.json"))
    assert len(files) == 1, f"expected one {subject} smoke JSON in {out}, found {[f.name for f in files]}"
    rows = json.loads(files[0].read_text())
    assert isinstance(rows, list) and rows
    return rows


def _assert_measured(row: dict) -> None:
    assert row["status"] == "ok", row
    for key in ("ms_fwd", "ms_bwd", "ms_total"):
        assert math.isfinite(row[key]), (key, row)
    assert row["ms_fwd"] > 0 and row["ms_total"] > 0, row
    for key in STAMP_KEYS:
        assert key in row, key
    assert row["device"].startswith("cpu"), row["device"]


def _assert_attention_rows(rows: list[dict]) -> None:
    ours = [r for r in rows if r["impl"] == "ours"]
    assert {r["seqlen"] for r in ours} == {32, 64}
    for r in ours:
        _assert_measured(r)
        assert r["subject"] == "attention" and r["dtype"] == "float32" and r["causal"] is True
        assert r["ms_bwd"] > 0
        assert r["flops_fwd"] == 4 * r["batch"] * r["heads"] * r["seqlen"] ** 2 * r["head_dim"] / 2
        assert r["flops_bwd"] == 2.5 * r["flops_fwd"]
        assert r["tflops_total"] > 0
        assert r["max_abs_err"] < MAX_ABS_ERR, r["max_abs_err_by_tensor"]
        assert set(r["max_abs_err_by_tensor"]) == {"out", "dq", "dk", "dv"}
        assert r["peak_mem_bytes"] is None  # no memory counter on the CPU
    math_rows = [r for r in rows if r["impl"] == "sdpa_math"]
    assert math_rows and all(r["status"] == "ok" for r in math_rows)
    # cuDNN has no CPU kernel: recorded as unsupported with a reason, not a crash.
    cudnn = [r for r in rows if r["impl"] == "sdpa_cudnn"]
    assert cudnn and all(r["status"].startswith("unsupported: ") and r["error"] for r in cudnn)
    assert all("speedup_total_vs_sdpa_flash" in r for r in ours if any(
        p["impl"] == "sdpa_flash" and p["status"] == "ok" and p["seqlen"] == r["seqlen"] for p in rows))


def _assert_cross_entropy_rows(rows: list[dict]) -> None:
    by = {(r["op"], r["impl"]): r for r in rows}
    assert set(by) >= {("cross_entropy", "ours"), ("cross_entropy", "eager"),
                       ("linear_logprobs", "ours"), ("linear_logprobs", "ref")}
    assert ("cross_entropy", "torch_compile") not in by  # skipped in smoke runs
    for key in (("cross_entropy", "ours"), ("linear_logprobs", "ours")):
        r = by[key]
        _assert_measured(r)
        assert r["subject"] == "cross_entropy" and r["dtype"] == "float32"
        assert r["max_abs_err"] < MAX_ABS_ERR, r["max_abs_err_by_tensor"]
        assert r["flops_total"] == 6 * r["tokens"] * r["vocab"] * r["hidden"]
    assert set(by[("cross_entropy", "ours")]["max_abs_err_by_tensor"]) == {"loss", "grad_hidden", "grad_weight"}
    assert by[("cross_entropy", "ours")]["time_ratio_vs_eager"] > 0
    assert by[("linear_logprobs", "ours")]["time_ratio_vs_ref"] > 0
    _assert_measured(by[("cross_entropy", "eager")])


def test_attention_smoke(smoke_runs):
    rc, output, out = smoke_runs["attention"]
    assert rc == 0, output[-3000:]
    _assert_attention_rows(_rows(out, "attention"))
    assert "TARGETS: not evaluated" in output  # targets only judge GPU runs; never an exit status


def test_cross_entropy_smoke(smoke_runs):
    rc, output, out = smoke_runs["cross_entropy"]
    assert rc == 0, output[-3000:]
    _assert_cross_entropy_rows(_rows(out, "cross_entropy"))


def test_gpu_check_smoke(smoke_runs):
    rc, output, out = smoke_runs["gpu_check"]
    assert rc == 0, output[-3000:]
    main_log = sorted(out.glob("gpu_check-*-smoke.log"))
    assert len(main_log) == 1, sorted(p.name for p in out.iterdir())
    prefix = main_log[0].name.removesuffix(".log")  # gpu_check-<date>-smoke
    for part in ("", "-build_ext", "-tests", "-attention", "-cross_entropy", "-fused_ops", "-decode"):
        log = out / f"{prefix}{part}.log"
        assert log.is_file() and log.stat().st_size > 0, log
    tests_log = (out / f"{prefix}-tests.log").read_text()
    collected = re.search(r"collected (\d+) GPU tests", tests_log)
    assert collected and int(collected.group(1)) > 0, tests_log[-2000:]
    assert " skipped" in tests_log and " failed" not in tests_log  # GPU tests: collected, skipped on a CPU
    assert sorted(p.name for p in out.glob(f"{prefix}-tests-shard*.log")) == [
        f"{prefix}-tests-shard0.log", f"{prefix}-tests-shard1.log"]
    assert "exit status 0" in main_log[0].read_text()
    _assert_attention_rows(_rows(out, "attention"))
    _assert_cross_entropy_rows(_rows(out, "cross_entropy"))
