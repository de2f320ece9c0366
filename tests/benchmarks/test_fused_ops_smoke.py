"""benchmarks/fused_ops.py --smoke runs end to end on the CPU and writes sane, stamped JSON rows."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 300
# fp32 on tiny shapes: ours vs the float64 reference stays near fp32 rounding.
MAX_ABS_ERR = 1e-4
STAMP_KEYS = ("device", "torch", "triton", "python", "date", "git_commit")
OPS = {"rms_norm", "add_rms_norm", "rope", "swiglu"}


def test_fused_ops_smoke(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "benchmarks/fused_ops.py", "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = sorted(tmp_path.glob("fused_ops-*-smoke.json"))
    assert len(files) == 1, [f.name for f in tmp_path.iterdir()]
    rows = json.loads(files[0].read_text())
    seen = {(r["op"], r["direction"], r["impl"], r["hidden"]) for r in rows}
    assert seen == {(op, d, impl, h) for op in OPS for d in ("fwd", "bwd") for impl in ("ours", "eager")
                    for h in (64, 257)}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["dtype"] == "float32" and r["device"].startswith("cpu"), r
        assert math.isfinite(r["ms"]) and r["ms"] > 0 and r["bytes"] > 0 and r["gbps"] > 0, r
        assert r["copy_gbps"] > 0 and math.isclose(r["pct_of_copy"], 100 * r["gbps"] / r["copy_gbps"]), r
        for key in STAMP_KEYS:
            assert key in r, key
        if r["impl"] == "ours":
            assert r["max_abs_err"] < MAX_ABS_ERR, r
    assert "TARGETS: not evaluated" in proc.stdout
