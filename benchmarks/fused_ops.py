"""Memory-bound fused ops (csrc/): GB/s of rms_norm, add+rms_norm, rope and swiglu, forward and backward.

Ours (``llmsys.kernels.rms_norm / apply_rotary / swiglu``: the CUDA kernels on a GPU, the C++ twins on
a CPU) against, in the same run, the eager PyTorch reference each op replaces (``*_ref``, what the
model computes with ``model.norm/rope/mlp=torch``) and ``torch.compile`` of that same reference.

GB/s counts the bytes an op must move at least (every input read once, every output written once;
weights, rstd and cos/sin tables, < 0.1% at these sizes, are left out), divided by the median time, so
implementations that move more (eager's fp32 temporaries) show up as lower GB/s:

    rms_norm      fwd: read x, write y = 2 N·C            bwd: read dy, x, write dx = 3 N·C
    add_rms_norm  fwd: read x, r, write y, h = 4 N·C      bwd: read dy, dh, h, write dx = 4 N·C
    rope          fwd: read x, write out = 2 N·H·D        bwd: the same
    swiglu        fwd: read gate, up, write out = 3 N·F   bwd: read dout, gate, up, write 2 = 5 N·F

(times the element size). The device's copy bandwidth is measured in the same run (a 1 GiB
device-to-device ``copy_``, read + write counted) and every row carries ``pct_of_copy``. Target
(printed PASS / FAIL, never an exit status): ours >= 85% of the copy bandwidth for every op and
direction at bf16, 16k tokens, hidden 2048..16384, on a GPU.

Points: ``--tokens`` rows (rope: tokens = B·T with B = 4, heads of 128) for every ``--hidden`` (for
swiglu the MLP width; for rope H·D). Each point of ours is spot-checked against the reference
(float64 for fp32 inputs, fp32 otherwise): ``max_abs_err`` over outputs and gradients, with the
reference's own error in the input dtype beside it (``ref_same_dtype_max_abs_err``).

    python benchmarks/fused_ops.py --smoke     # CPU, seconds: fp32, tiny shapes, ours vs eager
    python benchmarks/fused_ops.py             # GPU: bf16, 16k tokens, hidden 2048..16384

Results: ``fused_ops-<device>-<date>[-smoke].json`` (+ ``.png`` with matplotlib) in $OUT or
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# First, before anything that could import triton: sets TRITON_INTERPRET=1 when there is no CUDA.
import llmsys.kernels  # noqa: E402,F401

from benchmarks.common import (  # noqa: E402
    OOM, Results, add_run_args, bench_device, default_out_dir, dtype_from_name, free_memory, int_list, max_abs_err,
    print_table, pyplot, stamp, synchronize, time_ms, verdict,
)
from llmsys.kernels._ext import load_extension  # noqa: E402
from llmsys.kernels.rms_norm import rms_norm, rms_norm_ref  # noqa: E402
from llmsys.kernels.rotary import apply_rotary, apply_rotary_ref  # noqa: E402
from llmsys.kernels.swiglu import swiglu, swiglu_ref  # noqa: E402
from llmsys.models.transformer import rotary_tables  # noqa: E402

EPS = 1e-6
ROPE_HEAD_DIM = 128
ROPE_BATCH = 4
SPOT_CHECK_ROWS = 256
TARGET_PCT_OF_COPY = 85.0
TARGET_DTYPE = "bfloat16"
COPY_BYTES = 1 << 30  # 1 GiB each way: far beyond any L2, so the copy measures HBM


@dataclass
class Op:
    name: str
    ours: Callable
    ref: Callable
    make: Callable  # (tokens, hidden, dtype, device) -> (inputs requiring grad, other args, upstream grads)
    bytes_fwd: int  # elements moved per (token, hidden) element, forward
    bytes_bwd: int


def _randn(gen, shape, dtype, device, grad=False):
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    return t.requires_grad_(grad)


def make_norm(residual: bool):
    def make(tokens, hidden, dtype, device, gen):
        x = _randn(gen, (tokens, hidden), dtype, device, True)
        w = (1 + 0.1 * _randn(gen, (hidden,), torch.float32, device)).to(dtype).requires_grad_()
        if not residual:
            return (x, w), (EPS,), (_randn(gen, (tokens, hidden), dtype, device),)
        r = _randn(gen, (tokens, hidden), dtype, device, True)
        return (x, w, r), (), tuple(_randn(gen, (tokens, hidden), dtype, device) for _ in range(2))
    return make


def make_rope(tokens, hidden, dtype, device, gen):
    B, H = ROPE_BATCH, max(1, hidden // ROPE_HEAD_DIM)
    T = max(1, tokens // B)
    x = _randn(gen, (B, T, H, ROPE_HEAD_DIM), dtype, device, True)
    cos, sin = rotary_tables(T, ROPE_HEAD_DIM, 10000.0, device)
    return (x,), (cos, sin), (_randn(gen, (B, T, H, ROPE_HEAD_DIM), dtype, device),)


def make_swiglu(tokens, hidden, dtype, device, gen):
    gate, up = (_randn(gen, (tokens, hidden), dtype, device, True) for _ in range(2))
    return (gate, up), (), (_randn(gen, (tokens, hidden), dtype, device),)


def _add_norm(fn):
    return lambda x, w, r: fn(x, w, EPS, r)


OPS = {
    "rms_norm": Op("rms_norm", rms_norm, rms_norm_ref, make_norm(False), 2, 3),
    "add_rms_norm": Op("add_rms_norm", _add_norm(rms_norm), _add_norm(rms_norm_ref), make_norm(True), 4, 4),
    "rope": Op("rope", apply_rotary, apply_rotary_ref, make_rope, 2, 2),
    "swiglu": Op("swiglu", swiglu, swiglu_ref, make_swiglu, 3, 5),
}


def _outs(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def copy_bandwidth_gbps(device: torch.device, timing: dict, nbytes: int) -> float:
    """Device-to-device copy: (read + write) bytes / median time."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, **timing)
    del src, dst
    free_memory(device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def spot_check(op: Op, inputs, args, grads) -> dict:
    """max |ours - truth| over outputs and input gradients on the first rows, and the reference's own error."""
    rows = slice(0, SPOT_CHECK_ROWS)
    truth_dtype = torch.float64 if inputs[0].dtype == torch.float32 else torch.float32

    def cut(t, is_weight):
        return t if is_weight else (t[:, :SPOT_CHECK_ROWS] if op.name == "rope" else t[rows])

    def run(fn, dtype):
        xs = [cut(t.detach(), t.dim() == 1).to(dtype or t.dtype).requires_grad_() for t in inputs]
        gs = [cut(g, False) for g in grads]
        outs = _outs(fn(*xs, *args))
        ds = torch.autograd.grad(outs, xs, [g.to(o.dtype) for g, o in zip(gs, outs)])
        return [o.detach() for o in outs] + list(ds)

    truth = run(op.ref, truth_dtype)
    ours = run(op.ours, None)
    same = run(op.ref, None)
    return {"max_abs_err": max(max_abs_err(a, b) for a, b in zip(ours, truth)),
            "ref_same_dtype_max_abs_err": max(max_abs_err(a, b) for a, b in zip(same, truth))}


def measure(op: Op, impl: str, fn: Callable, tokens: int, hidden: int, dtype, device, timing, copy_gbps) -> list[dict]:
    base = {"op": op.name, "impl": impl, "tokens": tokens, "hidden": hidden,
            "dtype": str(dtype).removeprefix("torch."), "copy_gbps": copy_gbps}
    gen = torch.Generator(device=device).manual_seed(0)
    try:
        inputs, args, grads = op.make(tokens, hidden, dtype, device, gen)
        elements = inputs[0].numel()
        base["shape"] = list(inputs[0].shape)  # rope: (B, T, H, 128), H = max(1, hidden // 128)
        outs = _outs(fn(*inputs, *args))  # the probe (also compiles torch.compile)
        torch.autograd.grad(outs, inputs, [g.to(o.dtype) for g, o in zip(grads, outs)])
        check = spot_check(op, inputs, args, grads) if impl == "ours" else {}

        def forward():
            return fn(*inputs, *args)

        ms_fwd = time_ms(forward, device, **timing)
        outs = _outs(forward())

        def backward():
            return torch.autograd.grad(outs, inputs, [g.to(o.dtype) for g, o in zip(grads, outs)], retain_graph=True)

        ms_bwd = time_ms(backward, device, **timing)
    except ValueError as e:  # our wrappers refusing, e.g. CUDA tensors with an extension built without CUDA
        return [{**base, "direction": d, "status": f"unsupported: {' '.join(str(e).split())[:200]}"}
                for d in ("fwd", "bwd")]
    except OOM as e:
        free_memory(device)
        return [{**base, "direction": d, "status": "oom", "error": str(e).splitlines()[0][:500]}
                for d in ("fwd", "bwd")]
    rows = []
    for direction, ms, per_element in (("fwd", ms_fwd, op.bytes_fwd), ("bwd", ms_bwd, op.bytes_bwd)):
        nbytes = per_element * elements * dtype.itemsize
        gbps = nbytes / (ms * 1e-3) / 1e9
        rows.append({**base, "direction": direction, "status": "ok", "ms": ms, "bytes": nbytes, "gbps": gbps,
                     "pct_of_copy": 100 * gbps / copy_gbps, **check})
    del inputs, args, grads, outs
    free_memory(device)
    return rows


def implementations(op: Op, smoke: bool, compile_: bool) -> list[tuple[str, Callable]]:
    impls = [("ours", op.ours), ("eager", op.ref)]
    if compile_ and not smoke:
        impls.append(("torch_compile", torch.compile(op.ref)))
    return impls


def check_targets(rows: list[dict], device: torch.device) -> None:
    points = [r for r in rows if r["impl"] == "ours" and r["status"] == "ok" and r["dtype"] == TARGET_DTYPE
              and 2048 <= r["hidden"] <= 16384]
    if device.type != "cuda" or not points:
        print("TARGETS: not evaluated (they need bf16, hidden 2048..16384 on a GPU)")
        return
    for r in points:
        r["targets"] = [verdict(f"{r['op']} {r['direction']} N={r['tokens']} C={r['hidden']} bf16 % of copy BW",
                                r["pct_of_copy"], TARGET_PCT_OF_COPY, True)]


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no plot")
        return
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(2, len(ops), figsize=(4 * len(ops), 7), squeeze=False)
    for j, name in enumerate(ops):
        for i, direction in enumerate(("fwd", "bwd")):
            ax = axes[i][j]
            for impl in dict.fromkeys(r["impl"] for r in rows):
                pts = [r for r in rows if (r["op"], r["direction"], r["impl"]) == (name, direction, impl)
                       and r["status"] == "ok"]
                if pts:
                    ax.plot([r["hidden"] for r in pts], [r["gbps"] for r in pts], marker="o", label=impl,
                            linewidth=2.5 if impl == "ours" else 1.2)
            ax.axhline(rows[0]["copy_gbps"], color="gray", linestyle="--", label="copy")
            ax.axhline(rows[0]["copy_gbps"] * TARGET_PCT_OF_COPY / 100, color="gray", linestyle=":",
                       label=f"{TARGET_PCT_OF_COPY:.0f}% of copy")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{name} {direction}")
            ax.set_xlabel("hidden")
            ax.set_ylabel("GB/s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    r0 = rows[0]
    fig.suptitle(f"fused ops, {r0['tokens']} tokens, {r0['dtype']}, {r0['device']} ({r0['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


TABLE = [("op", "op", ""), ("dir", "direction", ""), ("impl", "impl", ""), ("N", "tokens", ""),
         ("C", "hidden", ""), ("ms", "ms", ".4f"), ("GB/s", "gbps", ".1f"), ("% copy", "pct_of_copy", ".1f"),
         ("err", "max_abs_err", ".1e"), ("ref err", "ref_same_dtype_max_abs_err", ".1e"), ("status", "status", "")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int_list, default=int_list("2048,4096,8192,16384"))
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {list(OPS)}")
    p.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile baseline")
    add_run_args(p, "CPU seconds-long run: fp32, 64 tokens, hidden 64 and 257")
    args = p.parse_args()

    device = bench_device()
    copy_bytes = COPY_BYTES
    if args.smoke:
        args.tokens, args.hidden, args.dtype = 64, [64, 257], "fp32"
        args.warmup_ms, args.rep_ms = 0.0, 5.0
        copy_bytes = 16 << 20
    dtype = dtype_from_name(args.dtype)
    ops = [OPS[name] for name in args.ops.split(",") if name]
    timing = {"warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "min_reps": 3 if args.smoke else 10}
    t0 = time.perf_counter()
    module = load_extension()
    print(f"extension {module.__name__} loaded in {time.perf_counter() - t0:.1f} s (CUDA kernels: {module.with_cuda})")
    results = Results("fused_ops", stamp(device), args.out or default_out_dir(), args.smoke)
    copy_gbps = copy_bandwidth_gbps(device, timing, copy_bytes)
    synchronize(device)
    print(f"fused_ops on {results.stamp['device']}: torch {results.stamp['torch']}, {args.dtype}, tokens "
          f"{args.tokens}, hidden {args.hidden}, ops {[o.name for o in ops]}; copy bandwidth {copy_gbps:.1f} GB/s")

    start = time.perf_counter()
    points = [(op, h) for op in ops for h in args.hidden]
    for i, (op, hidden) in enumerate(points):
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            print(f"time budget of {args.budget_s:.0f} s spent: skipped {len(points) - i} points")
            break
        for impl, fn in implementations(op, args.smoke, args.compile):
            for row in measure(op, impl, fn, args.tokens, hidden, dtype, device, timing, copy_gbps):
                results.add(row)
                if row["status"] == "ok":
                    print(f"  {op.name:>12} {row['direction']} {impl:>13} C={hidden:<6} {row['ms']:.4f} ms "
                          f"{row['gbps']:.1f} GB/s ({row['pct_of_copy']:.0f}% of copy)", flush=True)
                else:
                    print(f"  {op.name:>12} {row['direction']} {impl:>13} C={hidden:<6} {row['status']}", flush=True)
    check_targets(results.rows, device)
    results.save()
    print()
    print_table(results.rows, TABLE)
    print(f"wrote {results.json_path}")
    plot(results.rows, results.png_path)


if __name__ == "__main__":
    main()
