"""benchmarks/decode.py --smoke runs end to end on the CPU (the C++ twin vs SDPA) and writes sane JSON rows."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.benchmarks import run_smoke

REPO = Path(__file__).resolve().parents[2]
# Generous: the subprocess may have to build llmsys._C first (~70 s cold on 2 cores); cached it takes seconds.
RUN_TIMEOUT_S = 600
MAX_ABS_ERR = 1e-4  # fp32 on tiny shapes vs the fp64 reference
STAMP_KEYS = ("device", "torch", "triton", "python", "date", "git_commit")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode")
    rc, output = run_smoke("decode.py", out, RUN_TIMEOUT_S)
    return rc, output, out


def test_decode_smoke(smoke_run):
    rc, output, out = smoke_run
    assert rc == 0, output[-3000:]
    assert "TARGETS: not evaluated" in output  # targets only judge GPU runs; never an exit status
    files = sorted(out.glob("decode-*-smoke.json"))
    assert len(files) == 1, sorted(p.name for p in out.iterdir())
    rows = json.loads(files[0].read_text())
    points = {(1, 64), (1, 200), (3, 64), (3, 200)}
    ours = [r for r in rows if r["impl"] == "ours"]
    assert {(r["batch"], r["seqlen"]) for r in ours} == points
    for r in rows:
        assert r["subject"] == "decode"
        for key in STAMP_KEYS:
            assert key in r, key
        assert r["device"].startswith("cpu"), r["device"]
    for r in ours:
        assert r["status"] == "ok", r
        assert r["dtype"] == "float32" and (r["heads_q"], r["heads_kv"], r["head_dim"]) == (8, 2, 64)
        assert math.isfinite(r["ms"]) and r["ms"] > 0
        # K and V of every position plus q and out, 4 bytes each.
        assert r["kv_bytes"] == 4 * (2 * r["batch"] * r["seqlen"] * 2 * 64 + 2 * r["batch"] * 8 * 64)
        assert r["gbps"] == pytest.approx(r["kv_bytes"] / (r["ms"] * 1e-3) / 1e9)
        assert r["max_abs_err"] < MAX_ABS_ERR, r
        assert r["ref_same_dtype_max_abs_err"] < MAX_ABS_ERR
        assert r["speedup_vs_sdpa"] > 0 and r["best_sdpa"] in ("sdpa", "sdpa_flash")
    sdpa = [r for r in rows if r["impl"] == "sdpa"]
    assert {(r["batch"], r["seqlen"]) for r in sdpa} == points and all(r["status"] == "ok" for r in sdpa)
