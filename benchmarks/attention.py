"""Attention kernels: forward, backward and fwd+bwd TFLOP/s and peak memory, sweeping the sequence length.

Ours (`llmsys.kernels.flash_attention`, Triton FlashAttention-2) against, in the same run, torch SDPA
with each backend forced through `torch.nn.attention.sdpa_kernel` (FLASH_ATTENTION, CUDNN_ATTENTION,
EFFICIENT_ATTENTION, and MATH, the plain-PyTorch reference) and the flash-attn package
(`flash_attn.flash_attn_func`, and FA3's `flash_attn_interface` on Hopper) when importable. The
batch is sized so batch x seqlen stays at ``--tokens`` (16k), as flash-attention's own benchmarks do.

FLOPs (`flops()`): forward 4·B·H·Tq·Tk·D (two matmuls of 2·Tq·Tk·D each per head), halved when
causal; backward 2.5x the forward (five matmuls instead of two, recompute of Q·K^T included), as
flash-attention's benchmarks count it; total 3.5x. TFLOP/s = flops / median time. No GB/s: at these
shapes attention is compute bound and the bytes moved are not a useful figure.

Timing: median over ~100 ms of calls after ~25 ms of warm-up (CUDA events). ``fwd`` is a forward
with inputs that require grad (so it saves for the backward), ``bwd`` a backward through a kept
graph (``retain_graph``), ``total`` a fresh forward + backward. Peak memory: the most allocated
above the inputs during one forward + backward, gradients included.

Each point of ours is first checked against `flash_attention_ref` on one batch entry and two heads
(output and dq, dk, dv; fp32 truth for half inputs, fp64 for fp32), and the error of the same
reference computed in the input dtype is stored beside it for scale. A backend that refuses a
shape or dtype is recorded as ``unsupported: <reason>``; a point that runs out of memory as ``oom``.
Targets (printed PASS / FAIL, never an exit status): causal bf16 head_dim 128, seqlen 2k-16k,
fwd+bwd: ours >= 1.2x SDPA flash and >= 1.0x SDPA cuDNN (meant for an H100/H200).

    python benchmarks/attention.py --smoke                       # CPU interpreter, fp32, seconds
    python benchmarks/attention.py                               # GPU: seqlen 512..16k, d 64/128, causal
    python benchmarks/attention.py --causal both --head-dims 128 --seqlens 1k,4k,16k --impls ours,sdpa_flash

Results: ``attention-<device>-<date>[-smoke].json`` (+ ``.png`` with matplotlib) in $OUT or
benchmarks/results/.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# First, before anything that could import triton: sets TRITON_INTERPRET=1 when there is no CUDA.
import llmsys.kernels  # noqa: E402,F401
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from benchmarks.common import (  # noqa: E402
    OOM, Results, add_run_args, bench_device, default_out_dir, dtype_from_name, free_memory, int_list, max_abs_err,
    optional_module, peak_memory_bytes, print_table, pyplot, stamp, time_ms, verdict,
)
from llmsys.kernels.flash_attention import flash_attention, flash_attention_ref  # noqa: E402

SDPA_BACKENDS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
SPEEDUP_PEERS = ("sdpa_flash", "sdpa_cudnn", "flash_attn2", "flash_attn3")
# The targets: causal bf16 head_dim 128, seqlen 2k..16k, fwd+bwd, on an H100/H200.
TARGETS = {"sdpa_flash": 1.2, "sdpa_cudnn": 1.0}
TARGET_SEQLENS = (2048, 16384)
SPOT_CHECK_HEADS = 2


def flops(batch: int, seqlen_q: int, seqlen_k: int, heads: int, head_dim: int, causal: bool, mode: str) -> float:
    """Matmul FLOPs of attention: fwd 4·B·H·Tq·Tk·D (/2 causal), bwd 2.5x fwd, total 3.5x fwd."""
    fwd = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim
    if causal:
        fwd /= 2
    return {"fwd": fwd, "bwd": 2.5 * fwd, "total": 3.5 * fwd}[mode]


@dataclass
class Impl:
    name: str
    layout: str  # "bthd" (ours, flash-attn) or "bhtd" (SDPA): inputs are made contiguous in it
    call: Callable  # (q, k, v, causal) -> out
    refusal: tuple[type[BaseException], ...]  # what the implementation raises for a shape/dtype it refuses


def _sdpa(backend):
    def call(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return call


def _first(out):
    return out[0] if isinstance(out, tuple) else out  # FA3 returned (out, lse) in some releases


def implementations(selected: list[str] | None) -> list[Impl]:
    impls = [Impl("ours", "bthd", lambda q, k, v, c: flash_attention(q, k, v, causal=c), (ValueError,))]
    # SDPA with a forced backend raises RuntimeError("No available kernel") after warning why.
    impls += [Impl(name, "bhtd", _sdpa(b), (RuntimeError,)) for name, b in SDPA_BACKENDS.items()]
    fa2 = optional_module("flash_attn")
    if fa2 is not None:
        impls.append(Impl("flash_attn2", "bthd", lambda q, k, v, c: fa2.flash_attn_func(q, k, v, causal=c),
                          (RuntimeError,)))
    fa3 = optional_module("flash_attn_interface")
    if fa3 is not None:
        impls.append(Impl("flash_attn3", "bthd", lambda q, k, v, c: _first(fa3.flash_attn_func(q, k, v, causal=c)),
                          (RuntimeError,)))
    if selected is not None:
        known = {i.name for i in impls} | {"flash_attn2", "flash_attn3"}
        unknown = set(selected) - known
        if unknown:
            raise SystemExit(f"unknown --impls {sorted(unknown)}; known: {sorted(known)}")
        impls = [i for i in impls if i.name in selected]
    return impls


def make_inputs(layout, batch, seqlen, heads, head_dim, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: no host round trip
    shape = (batch, seqlen, heads, head_dim) if layout == "bthd" else (batch, heads, seqlen, head_dim)
    q, k, v, dout = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout


def spot_check(q, k, v, dout, out, grads, causal) -> dict:
    """Ours (computed on the full batch) vs flash_attention_ref on batch entry 0 and the first heads."""
    hs = min(SPOT_CHECK_HEADS, q.shape[2])
    truth_dtype = torch.float64 if q.dtype == torch.float32 else torch.float32

    def ref(dtype):
        qs, ks, vs = (t.detach()[:1, :, :hs].to(dtype).requires_grad_() for t in (q, k, v))
        o = flash_attention_ref(qs, ks, vs, causal=causal)
        return (o.detach(), *torch.autograd.grad(o, (qs, ks, vs), dout[:1, :, :hs].to(dtype)))

    truth = ref(truth_dtype)
    ours = [t.detach()[:1, :, :hs] for t in (out, *grads)]
    errs = {n: max_abs_err(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), ours, truth)}
    same = ref(q.dtype)  # PyTorch's own error in the input dtype, for scale
    return {"max_abs_err": max(errs.values()), "max_abs_err_by_tensor": errs,
            "ref_same_dtype_max_abs_err": max(max_abs_err(a, b) for a, b in zip(same, truth))}


def _measure(impl: Impl, batch, seqlen, heads, head_dim, dtype, causal, device, timing) -> dict:
    q, k, v, dout = make_inputs(impl.layout, batch, seqlen, heads, head_dim, dtype, device)
    inputs = (q, k, v)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:  # the probe: one forward + backward (also autotunes ours before any timing)
            out = impl.call(q, k, v, causal)
            grads = torch.autograd.grad(out, inputs, dout)
        except impl.refusal as e:
            # SDPA's warnings say why each backend declined; its error only says that none was left.
            why = [str(w.message).strip() for w in caught] + [str(e).strip()]
            return {"status": f"unsupported: {' '.join(why[0].split())[:200]}", "error": " | ".join(why)[:4000]}
    row = {"status": "ok"}
    if impl.name == "ours":
        row.update(spot_check(q, k, v, dout, out, grads, causal))
    del grads
    out = impl.call(q, k, v, causal)  # the probe's graph was freed by its backward: keep a fresh one

    def forward():
        return impl.call(q, k, v, causal)

    def backward():  # through the kept graph of `out`
        return torch.autograd.grad(out, inputs, dout, retain_graph=True)

    def forward_backward():
        return torch.autograd.grad(impl.call(q, k, v, causal), inputs, dout)

    row["ms_fwd"] = time_ms(forward, device, **timing)
    row["ms_bwd"] = time_ms(backward, device, **timing)
    del out  # its graph (tens of GB for MATH at 16k) must not sit beside the next measurements
    row["ms_total"] = time_ms(forward_backward, device, **timing)
    row["peak_mem_bytes"] = peak_memory_bytes(forward_backward, device)
    return row


def measure(impl: Impl, batch, seqlen, heads, head_dim, dtype, causal, device, timing) -> dict:
    row = {"impl": impl.name, "batch": batch, "seqlen": seqlen, "heads": heads, "head_dim": head_dim,
           "dtype": str(dtype).removeprefix("torch."), "causal": causal,
           "flops_fwd": flops(batch, seqlen, seqlen, heads, head_dim, causal, "fwd"),
           "flops_bwd": flops(batch, seqlen, seqlen, heads, head_dim, causal, "bwd")}
    try:
        row.update(_measure(impl, batch, seqlen, heads, head_dim, dtype, causal, device, timing))
    except OOM as e:
        row.update(status="oom", error=str(e).splitlines()[0][:500])
    free_memory(device)
    if row["status"] == "ok":
        for mode in ("fwd", "bwd", "total"):
            f = flops(batch, seqlen, seqlen, heads, head_dim, causal, mode)
            row[f"tflops_{mode}"] = f / (row[f"ms_{mode}"] * 1e-3) / 1e12
    return row


def add_speedups(ours: dict, peers: list[dict]) -> None:
    """Per point: peer time / our time for fwd, bwd and total (> 1 means ours is faster)."""
    for peer in peers:
        if peer["impl"] in SPEEDUP_PEERS and peer["status"] == "ok" and ours["status"] == "ok":
            for mode in ("fwd", "bwd", "total"):
                ours[f"speedup_{mode}_vs_{peer['impl']}"] = peer[f"ms_{mode}"] / ours[f"ms_{mode}"]


def check_targets(rows: list[dict], device: torch.device) -> None:
    points = [r for r in rows if r["impl"] == "ours" and r["causal"] and r["dtype"] == "bfloat16"
              and r["head_dim"] == 128 and TARGET_SEQLENS[0] <= r["seqlen"] <= TARGET_SEQLENS[1]]
    if device.type != "cuda" or not points:
        print("TARGETS: not evaluated (they need causal bf16 head_dim 128 points at seqlen 2k-16k on a GPU)")
        return
    for r in points:
        r["targets"] = [
            verdict(f"attention causal bf16 d128 T={r['seqlen']} fwd+bwd ours vs {peer}",
                    r.get(f"speedup_total_vs_{peer}"), need, higher_is_better=True)
            for peer, need in TARGETS.items()
        ]


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no plot")
        return
    groups = sorted({(r["causal"], r["head_dim"]) for r in rows}, reverse=True)
    fig, axes = plt.subplots(len(groups), 3, figsize=(15, 4 * len(groups)), squeeze=False)
    for (causal, d), ax_row in zip(groups, axes):
        for mode, ax in zip(("fwd", "bwd", "total"), ax_row):
            for impl in dict.fromkeys(r["impl"] for r in rows):
                pts = [r for r in rows if r["impl"] == impl and r["causal"] == causal and r["head_dim"] == d
                       and r["status"] == "ok"]
                if pts:
                    ax.plot([r["seqlen"] for r in pts], [r[f"tflops_{mode}"] for r in pts], marker="o", label=impl,
                            linewidth=2.5 if impl == "ours" else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length (batch x seqlen fixed)")
            ax.set_ylabel(f"{mode} TFLOP/s")
            ax.set_title(f"{'causal' if causal else 'non-causal'}, head_dim {d}, {mode}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    r0 = rows[0]
    fig.suptitle(f"attention, {r0['dtype']}, {r0['heads']} heads, {r0['device']} ({r0['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


TABLE = [("impl", "impl", ""), ("T", "seqlen", ""), ("B", "batch", ""), ("D", "head_dim", ""),
         ("causal", "causal", ""), ("fwd ms", "ms_fwd", ".3f"), ("bwd ms", "ms_bwd", ".3f"),
         ("tot ms", "ms_total", ".3f"), ("fwd TF/s", "tflops_fwd", ".1f"), ("bwd TF/s", "tflops_bwd", ".1f"),
         ("tot TF/s", "tflops_total", ".1f"), ("peak MiB", "peak_mib", ".0f"), ("err", "max_abs_err", ".1e"),
         ("x flash", "speedup_total_vs_sdpa_flash", ".2f"), ("x cudnn", "speedup_total_vs_sdpa_cudnn", ".2f"),
         ("status", "status_short", "")]


def _printable(row: dict) -> dict:
    return {**row, "peak_mib": row["peak_mem_bytes"] / 2**20 if row.get("peak_mem_bytes") is not None else None,
            "status_short": row["status"][:60]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int_list, default=int_list("512,1k,2k,4k,8k,16k"), help="the swept axis")
    p.add_argument("--head-dims", type=int_list, default=[128, 64])
    p.add_argument("--tokens", type=int, default=16384, help="batch x seqlen (batch = max(1, tokens // seqlen))")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    p.add_argument("--causal", choices=["true", "false", "both"], default="true")
    p.add_argument("--impls", default=None, help="comma-separated subset: ours,sdpa_flash,sdpa_cudnn,"
                   "sdpa_efficient,sdpa_math,flash_attn2,flash_attn3 (default: all available)")
    add_run_args(p, "CPU seconds-long run: fp32, B<=2, H=2, T=32/64, D=16")
    args = p.parse_args()

    device = bench_device()
    if args.smoke:
        args.seqlens, args.head_dims, args.tokens, args.heads, args.dtype = [32, 64], [16], 64, 2, "fp32"
        args.warmup_ms, args.rep_ms = 0.0, 0.0
    dtype = dtype_from_name(args.dtype)
    timing = {"warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "min_reps": 1 if args.smoke else 5}
    impls = implementations(args.impls.split(",") if args.impls else None)
    causal_modes = {"true": [True], "false": [False], "both": [True, False]}[args.causal]
    results = Results("attention", stamp(device, ("flash_attn", "flash_attn_interface")),
                      args.out or default_out_dir(), args.smoke)
    print(f"attention on {results.stamp['device']}: torch {results.stamp['torch']}, triton {results.stamp['triton']}, "
          f"impls {[i.name for i in impls]}, {args.dtype}, heads {args.heads}, tokens {args.tokens}")

    start = time.perf_counter()
    points = [(c, d, t) for c in causal_modes for d in args.head_dims for t in args.seqlens]
    for n, (causal, head_dim, seqlen) in enumerate(points):
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            print(f"time budget of {args.budget_s:.0f} s spent: skipped {len(points) - n} points: {points[n:]}")
            break
        batch = max(1, args.tokens // seqlen)
        rows = []
        for impl in impls:
            rows.append(results.add(measure(impl, batch, seqlen, args.heads, head_dim, dtype, causal, device,
                                            timing)))
            r = _printable(rows[-1])
            print(f"  {r['impl']:>15} T={seqlen:<6} D={head_dim:<4} causal={causal!s:<5} "
                  + (f"fwd {r['ms_fwd']:.3f} ms bwd {r['ms_bwd']:.3f} ms total {r['ms_total']:.3f} ms "
                     f"{r['tflops_total']:.1f} TFLOP/s" if r["status"] == "ok" else r["status"]), flush=True)
        for ours in (r for r in rows if r["impl"] == "ours"):
            add_speedups(ours, rows)
    check_targets(results.rows, device)
    results.save()
    print()
    print_table([_printable(r) for r in results.rows], TABLE)
    print(f"wrote {results.json_path}")
    if results.rows:
        plot(results.rows, results.png_path)


if __name__ == "__main__":
    main()
