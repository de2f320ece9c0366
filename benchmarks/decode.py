"""KV-cache decode attention: time, GB/s of KV read and speedup over torch SDPA, sweeping batch x cache length.

Ours (`llmsys.kernels.decode_attention`, the CUDA flash-decoding kernel; the C++ CPU twin on a CPU)
against, in the same run, torch SDPA on *the same cache*: ``scaled_dot_product_attention(q[:, :, None],
k_cache[:, :S].transpose(1, 2), v_cache[:, :S].transpose(1, 2), enable_gqa=True)``, i.e. per-length
slicing (every sequence of a point has the same length S, so one slice serves the batch; no mask, which
would push SDPA off its flash kernel) with the kv heads shared natively, no copy. ``sdpa`` lets torch pick
the backend; ``sdpa_flash`` forces FLASH_ATTENTION (recorded ``unsupported: ...`` where it refuses).
The defaults are the issue's: GQA 8:1 (Hq=32, Hkv=4), head_dim 128, bf16, batch 1..128, cache 512..32k,
the cache allocated at exactly S positions (B, S, Hkv, D).

Bytes (`kv_bytes()`): what a decode step must read or write at least, K and V of every cached position
(2·B·S·Hkv·D elements) plus q and out (2·B·Hq·D); GB/s = bytes / median time. No FLOP/s: at one query
token per head this op is memory bound by construction.

Timing: median over ~100 ms of calls after ~25 ms of warm-up (CUDA events; benchmarks/common.py).
Each point of ours is first checked against `decode_attention_ref` on the first two sequences (fp64
truth for fp32, fp32 truth for half inputs), with the same reference run in the input dtype stored
beside it for scale. A point that runs out of memory is recorded ``oom``. Our rows carry
``num_splits`` (the heuristic's choice, csrc/include/llmsys/decode_attention.h) and
``speedup_vs_<peer>`` = peer time / our time.
Target (printed PASS / FAIL, never an exit status): ours >= 1.5x the faster SDPA variant at batch >= 16
and cache >= 4k (bf16, GPU).

    python benchmarks/decode.py --smoke       # CPU twin vs SDPA on tiny fp32 shapes, seconds
    python benchmarks/decode.py               # GPU: batch 1..128 x cache 512..32k, GQA 32:4, D 128, bf16
    python benchmarks/decode.py --batches 16,64 --seqlens 4k,16k --budget-s 60

Results: ``decode-<device>-<date>[-smoke].json`` (+ ``.png`` with matplotlib) in $OUT or benchmarks/results/.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    OOM, Results, add_run_args, bench_device, default_out_dir, dtype_from_name, free_memory, int_list, max_abs_err, print_table,
    pyplot, stamp, time_ms, verdict,
)
from llmsys.kernels.decode_attention import (  # noqa: E402
    decode_attention, decode_attention_num_splits, decode_attention_ref,
)

TARGET_SPEEDUP = 1.5
TARGET_MIN_BATCH = 16
TARGET_MIN_SEQLEN = 4096
SDPA_PEERS = ("sdpa", "sdpa_flash")
SPOT_CHECK_SEQS = 2


def kv_bytes(batch: int, seqlen: int, heads_q: int, heads_kv: int, head_dim: int, elem_size: int) -> int:
    """Minimum bytes a decode step moves: K and V of every cached position, plus q read and out written."""
    return elem_size * (2 * batch * seqlen * heads_kv * head_dim + 2 * batch * heads_q * head_dim)


@dataclass
class Impl:
    name: str
    call: Callable  # (q, k_cache, v_cache, cache_seqlens, seqlen) -> out (B, Hq, D)
    refusal: tuple[type[BaseException], ...]


def _sdpa(backend: SDPBackend | None) -> Callable:
    def call(q, k_cache, v_cache, cache_seqlens, seqlen):
        k = k_cache[:, :seqlen].transpose(1, 2)  # (B, Hkv, S, D) view of the cache, no copy
        v = v_cache[:, :seqlen].transpose(1, 2)
        if backend is None:
            return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]

    return call


def implementations(selected: list[str] | None) -> list[Impl]:
    impls = [
        Impl("ours", lambda q, k, v, s, _: decode_attention(q, k, v, s), (ValueError,)),
        Impl("sdpa", _sdpa(None), (RuntimeError,)),
        # A forced backend raises RuntimeError("No available kernel") after warning why.
        Impl("sdpa_flash", _sdpa(SDPBackend.FLASH_ATTENTION), (RuntimeError,)),
    ]
    if selected is not None:
        unknown = set(selected) - {i.name for i in impls}
        if unknown:
            raise SystemExit(f"unknown --impls {sorted(unknown)}; known: {[i.name for i in impls]}")
        impls = [i for i in impls if i.name in selected]
    return impls


def make_inputs(batch, seqlen, heads_q, heads_kv, head_dim, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: no host round trip
    q = torch.randn(batch, heads_q, head_dim, generator=gen, device=device, dtype=dtype)
    k = torch.randn(batch, seqlen, heads_kv, head_dim, generator=gen, device=device, dtype=dtype)
    v = torch.randn(batch, seqlen, heads_kv, head_dim, generator=gen, device=device, dtype=dtype)
    seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=device)
    return q, k, v, seqlens


def spot_check(q, k, v, seqlens, out) -> dict:
    """Ours (computed on the full batch) vs decode_attention_ref on the first sequences."""
    n = min(SPOT_CHECK_SEQS, q.shape[0])
    truth_dtype = torch.float64 if q.dtype == torch.float32 else torch.float32
    args = (q[:n], k[:n], v[:n], seqlens[:n])
    truth = decode_attention_ref(*(t.to(truth_dtype) for t in args[:3]), args[3])
    same = decode_attention_ref(*args)  # PyTorch's own error in the input dtype, for scale
    return {"max_abs_err": max_abs_err(out[:n], truth), "ref_same_dtype_max_abs_err": max_abs_err(same, truth)}


def _measure(impl: Impl, inputs, seqlen, device, timing) -> dict:
    q, k, v, seqlens = inputs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:  # the probe (also loads / builds the extension before any timing)
            out = impl.call(q, k, v, seqlens, seqlen)
        except impl.refusal as e:
            # SDPA's warnings say why each backend declined; its error only says that none was left.
            why = [str(w.message).strip() for w in caught] + [str(e).strip()]
            return {"status": f"unsupported: {' '.join(why[0].split())[:200]}", "error": " | ".join(why)[:4000]}
    row = {"status": "ok"}
    if impl.name == "ours":
        row.update(spot_check(q, k, v, seqlens, out))
    del out
    row["ms"] = time_ms(lambda: impl.call(q, k, v, seqlens, seqlen), device, **timing)
    return row


def measure(impl: Impl, batch, seqlen, heads_q, heads_kv, head_dim, dtype, device, timing) -> dict:
    elem = torch.finfo(dtype).bits // 8
    row = {"impl": impl.name, "batch": batch, "seqlen": seqlen, "heads_q": heads_q, "heads_kv": heads_kv,
           "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."),
           "kv_bytes": kv_bytes(batch, seqlen, heads_q, heads_kv, head_dim, elem)}
    if impl.name == "ours" and device.type == "cuda":
        row["num_splits"] = decode_attention_num_splits(batch, heads_q, heads_kv, seqlen)
    inputs = None
    try:
        inputs = make_inputs(batch, seqlen, heads_q, heads_kv, head_dim, dtype, device)
        row.update(_measure(impl, inputs, seqlen, device, timing))
    except OOM as e:
        row.update(status="oom", error=str(e).splitlines()[0][:500])
    del inputs
    free_memory(device)
    if row["status"] == "ok":
        row["gbps"] = row["kv_bytes"] / (row["ms"] * 1e-3) / 1e9
    return row


def add_speedups(ours: dict, peers: list[dict]) -> None:
    """Per point: peer time / our time (> 1 means ours is faster), and against the faster SDPA variant."""
    if ours["status"] != "ok":
        return
    ok = [p for p in peers if p["impl"] in SDPA_PEERS and p["status"] == "ok"]
    for peer in ok:
        ours[f"speedup_vs_{peer['impl']}"] = peer["ms"] / ours["ms"]
    if ok:
        best = min(ok, key=lambda p: p["ms"])
        ours["speedup_vs_best_sdpa"] = best["ms"] / ours["ms"]
        ours["best_sdpa"] = best["impl"]


def check_targets(rows: list[dict], device: torch.device) -> None:
    points = [r for r in rows if r["impl"] == "ours" and r["dtype"] == "bfloat16" and r["batch"] >= TARGET_MIN_BATCH
              and r["seqlen"] >= TARGET_MIN_SEQLEN]
    if device.type != "cuda" or not points:
        print(f"TARGETS: not evaluated (they need bf16 points at batch >= {TARGET_MIN_BATCH} and cache >= "
              f"{TARGET_MIN_SEQLEN} on a GPU)")
        return
    for r in points:
        r["targets"] = [verdict(f"decode bf16 B={r['batch']} S={r['seqlen']} ours vs best SDPA",
                                r.get("speedup_vs_best_sdpa"), TARGET_SPEEDUP, higher_is_better=True)]


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no plot")
        return
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4), squeeze=False)
    for batch, ax in zip(batches, axes[0]):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = [r for r in rows if r["impl"] == impl and r["batch"] == batch and r["status"] == "ok"]
            if pts:
                ax.plot([r["seqlen"] for r in pts], [r["gbps"] for r in pts], marker="o", label=impl,
                        linewidth=2.5 if impl == "ours" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cache length")
        ax.set_ylabel("GB/s (KV read)")
        ax.set_title(f"batch {batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    r0 = rows[0]
    fig.suptitle(f"decode attention, {r0['dtype']}, Hq {r0['heads_q']} / Hkv {r0['heads_kv']}, D {r0['head_dim']}, "
                 f"{r0['device']} ({r0['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


TABLE = [("impl", "impl", ""), ("B", "batch", ""), ("S", "seqlen", ""), ("splits", "num_splits", ""),
         ("ms", "ms", ".4f"), ("GB/s", "gbps", ".0f"), ("err", "max_abs_err", ".1e"),
         ("x sdpa", "speedup_vs_sdpa", ".2f"), ("x flash", "speedup_vs_sdpa_flash", ".2f"),
         ("status", "status_short", "")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int_list, default=int_list("1,4,16,32,64,128"))
    p.add_argument("--seqlens", type=int_list, default=int_list("512,1k,2k,4k,8k,16k,32k"),
                   help="cache lengths (every sequence of a point has this length)")
    p.add_argument("--heads-q", type=int, default=32)
    p.add_argument("--heads-kv", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    p.add_argument("--impls", default=None, help="comma-separated subset of ours,sdpa,sdpa_flash (default: all)")
    add_run_args(p, "CPU seconds-long run: fp32, B 1/3, S 64/200, Hq 8, Hkv 2, D 64")
    args = p.parse_args()

    device = bench_device()
    if args.smoke:
        args.batches, args.seqlens, args.heads_q, args.heads_kv, args.head_dim = [1, 3], [64, 200], 8, 2, 64
        args.dtype, args.warmup_ms, args.rep_ms = "fp32", 0.0, 0.0
    dtype = dtype_from_name(args.dtype)
    timing = {"warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "min_reps": 1 if args.smoke else 5}
    impls = implementations(args.impls.split(",") if args.impls else None)
    results = Results("decode", stamp(device), args.out or default_out_dir(), args.smoke)
    print(f"decode on {results.stamp['device']}: torch {results.stamp['torch']}, impls {[i.name for i in impls]}, "
          f"{args.dtype}, Hq {args.heads_q}, Hkv {args.heads_kv}, D {args.head_dim}")

    start = time.perf_counter()
    points = [(b, s) for b in args.batches for s in args.seqlens]
    for n, (batch, seqlen) in enumerate(points):
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            print(f"time budget of {args.budget_s:.0f} s spent: skipped {len(points) - n} points: {points[n:]}")
            break
        rows = []
        for impl in impls:
            rows.append(results.add(measure(impl, batch, seqlen, args.heads_q, args.heads_kv, args.head_dim, dtype,
                                            device, timing)))
            r = rows[-1]
            print(f"  {r['impl']:>10} B={batch:<4} S={seqlen:<6} "
                  + (f"{r['ms']:.4f} ms {r['gbps']:.0f} GB/s" if r["status"] == "ok" else r["status"]), flush=True)
        for ours in (r for r in rows if r["impl"] == "ours"):
            add_speedups(ours, rows)
    check_targets(results.rows, device)
    results.save()
    print()
    print_table([{**r, "status_short": r["status"][:60]} for r in results.rows], TABLE)
    print(f"wrote {results.json_path}")
    if results.rows:
        plot(results.rows, results.png_path)


if __name__ == "__main__":
    main()
