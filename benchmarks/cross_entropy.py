"""LM-head cross entropy: fwd+bwd time and peak memory of the fused kernel and its peers, sweeping the vocabulary.

Ours (`llmsys.kernels.fused_linear_cross_entropy`: token chunks, never the N x V logits) against, in
the same run, the eager reference ``F.cross_entropy(F.linear(h, w).float(), t)`` (what a model does
without the kernel), ``torch.compile`` of that same function, and Liger-Kernel's
``LigerFusedLinearCrossEntropyLoss`` (the best known peer) when ``liger_kernel`` is importable. Also
``linear_logprobs`` (per-token log p(target) and entropy, the RLHF path) against its reference
``linear_logprobs_ref``, both with random upstream gradients on both outputs.

Points: every (tokens, vocab) pair of ``--tokens`` x ``--vocab``; the default sweeps the vocabulary
(32k..256k) at 16k tokens, hidden 4096, bf16. Sweep the tokens instead with e.g.
``--tokens 4k,8k,16k,32k --vocab 128k``.

Timing: median over ~100 ms of calls (at least 5) after warm-up, CUDA events. ``fwd`` is the loss
with inputs that require grad, ``total`` forward + ``autograd.grad`` for hidden and weight, and
``bwd = total - fwd``: the fused kernels do the gradient GEMMs inside the forward (their backward
only rescales), so only ``total`` compares implementations fairly. TFLOP/s counts the model FLOPs
of the LM head, 6·N·V·H per fwd+bwd (2·N·V·H for the logits, 4·N·V·H for the two gradient GEMMs),
whatever an implementation recomputes; no GB/s, since the GEMMs dominate. Peak memory: the most
allocated above the inputs during one forward + backward, gradients included.

Each point of ours is first checked on the first (up to) 4096 tokens against the reference in fp32
(fp64 for fp32 inputs): loss / log-probs / entropy and both gradients, with the error of the
reference run in the input dtype stored beside it for scale. A point that runs out of memory is
recorded as ``oom`` (the eager path at 256k vocab and 32k tokens needs ~100 GB).
Targets (printed PASS / FAIL, never an exit status) at 16k tokens, hidden 4096, vocab 128k, bf16:
peak memory <= 10% of eager, time <= eager, faster than Liger.

    python benchmarks/cross_entropy.py --smoke            # CPU interpreter, fp32, seconds
    python benchmarks/cross_entropy.py                    # GPU: vocab 32k..256k at 16k tokens, bf16
    python benchmarks/cross_entropy.py --tokens 4k,8k,16k,32k --vocab 128k --no-compile

Results: ``cross_entropy-<device>-<date>[-smoke].json`` (+ ``.png`` with matplotlib) in $OUT or
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
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import (  # noqa: E402
    OOM, Results, add_run_args, bench_device, default_out_dir, dtype_from_name, free_memory, int_list, max_abs_err,
    optional_module, peak_memory_bytes, print_table, pyplot, stamp, time_ms, verdict,
)
from llmsys.kernels.cross_entropy import (  # noqa: E402
    fused_linear_cross_entropy, fused_linear_cross_entropy_ref, linear_logprobs, linear_logprobs_ref,
)

SPOT_CHECK_TOKENS = 4096
# The targets: 16k tokens, hidden 4096, vocab 128k (128000..131072), bf16, on an H100/H200.
TARGET_POINT = {"tokens": 16384, "hidden": 4096, "vocab": (128000, 131072), "dtype": "bfloat16"}
TARGET_MEM_RATIO_VS_EAGER = 0.10
TARGET_TIME_RATIO_VS_EAGER = 1.0
TARGET_TIME_RATIO_VS_LIGER = 1.0


def flops(tokens: int, vocab: int, hidden: int, mode: str = "total") -> float:
    """LM-head model FLOPs: logits 2·N·V·H forward, grad_hidden + grad_weight 4·N·V·H backward."""
    fwd = 2.0 * tokens * vocab * hidden
    return {"fwd": fwd, "bwd": 2 * fwd, "total": 3 * fwd}[mode]


def eager_cross_entropy(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets)


@dataclass
class Impl:
    name: str
    op: str  # "cross_entropy" (scalar mean loss) or "linear_logprobs" ((logp, entropy) per token)
    call: Callable  # (hidden (N, H), weight (V, H), targets (N,)) -> loss or (logp, entropy)
    refusal: tuple[type[BaseException], ...] = ()  # what it raises for inputs it refuses


def implementations(smoke: bool, compile_: bool) -> list[Impl]:
    impls = [Impl("ours", "cross_entropy", fused_linear_cross_entropy, (ValueError,)),
             Impl("eager", "cross_entropy", eager_cross_entropy)]
    if compile_ and not smoke:
        import torch._dynamo

        # dynamic=True: one compile serves the whole sweep (a static compile per shape would spend
        # the GPU check's time budget compiling); the GEMMs are cuBLAS either way.
        impls.append(Impl("torch_compile", "cross_entropy", torch.compile(eager_cross_entropy, dynamic=True),
                          (torch._dynamo.exc.TorchDynamoException,)))  # compile failures
    liger = optional_module("liger_kernel.transformers")
    if liger is not None:
        loss_fn = liger.LigerFusedLinearCrossEntropyLoss()

        def liger_call(hidden, weight, targets):
            out = loss_fn(weight, hidden, targets)  # Liger's order: (lin_weight, input, target)
            return out[0] if isinstance(out, tuple) else out

        impls.append(Impl("liger", "cross_entropy", liger_call))
    impls += [Impl("ours", "linear_logprobs", linear_logprobs, (ValueError,)),
              Impl("ref", "linear_logprobs", linear_logprobs_ref)]
    return impls


REFERENCES = {"cross_entropy": fused_linear_cross_entropy_ref, "linear_logprobs": linear_logprobs_ref}


def make_inputs(tokens, vocab, hidden, dtype, device, seed=0):
    """hidden (N, H) ~ N(0, 1), weight (V, H) scaled so logits ~ N(0, 1), targets (N,), upstream grads."""
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: 1G values at V=256k
    h = torch.randn(tokens, hidden, generator=gen, device=device, dtype=dtype).requires_grad_()
    w = torch.randn(vocab, hidden, generator=gen, device=device, dtype=dtype).mul_(hidden**-0.5).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    g = tuple(torch.randn(tokens, generator=gen, device=device) for _ in range(2))  # d/dlogp, d/dentropy
    return h, w, t, g


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _grad(out, h, w, g):
    outs = _outputs(out)
    upstream = [u.to(o.dtype) for o, u in zip(outs, g)] if outs[0].dim() else None  # scalar loss: d/dloss = 1
    return torch.autograd.grad(outs, (h, w), upstream)


def spot_check(impl: Impl, h, w, t, g) -> dict:
    """Ours vs the reference in fp32 (fp64 for fp32 inputs) on the first tokens: outputs and both grads."""
    n = min(SPOT_CHECK_TOKENS, h.shape[0])
    truth_dtype = torch.float64 if h.dtype == torch.float32 else torch.float32
    ref_fn = REFERENCES[impl.op]

    def run(fn, dtype):
        hs = h.detach()[:n].to(dtype).requires_grad_()
        ws = w.detach().to(dtype).requires_grad_()
        out = fn(hs, ws, t[:n])
        grads = _grad(out, hs, ws, tuple(u[:n] for u in g))
        return [o.detach() for o in _outputs(out)] + list(grads)

    truth = run(ref_fn, truth_dtype)
    names = (["loss"] if impl.op == "cross_entropy" else ["logp", "entropy"]) + ["grad_hidden", "grad_weight"]
    errs = {name: max_abs_err(a, b) for name, a, b in zip(names, run(impl.call, h.dtype), truth)}
    same = run(ref_fn, h.dtype)  # PyTorch's own error in the input dtype, for scale
    return {"max_abs_err": max(errs.values()), "max_abs_err_by_tensor": errs, "spot_check_tokens": n,
            "ref_same_dtype_max_abs_err": max(max_abs_err(a, b) for a, b in zip(same, truth))}


def _measure(impl: Impl, h, w, t, g, device, timing) -> dict:
    try:  # the probe: one forward + backward (also compiles torch.compile / Triton before any timing)
        _grad(impl.call(h, w, t), h, w, g)
    except impl.refusal as e:
        msg = str(e).strip()
        return {"status": f"unsupported: {' '.join(msg.split())[:200]}", "error": msg[:4000]}
    row = {"status": "ok"}
    if impl.name == "ours":
        row.update(spot_check(impl, h, w, t, g))

    def forward():
        return impl.call(h, w, t)

    def forward_backward():
        return _grad(impl.call(h, w, t), h, w, g)

    row["ms_fwd"] = time_ms(forward, device, **timing)
    row["ms_total"] = time_ms(forward_backward, device, **timing)
    row["ms_bwd"] = row["ms_total"] - row["ms_fwd"]
    row["peak_mem_bytes"] = peak_memory_bytes(forward_backward, device)
    return row


def measure(impl: Impl, h, w, t, g, device, timing) -> dict:
    tokens, hidden = h.shape
    vocab = w.shape[0]
    row = {"impl": impl.name, "op": impl.op, "tokens": tokens, "vocab": vocab, "hidden": hidden,
           "dtype": str(h.dtype).removeprefix("torch."), "flops_total": flops(tokens, vocab, hidden)}
    try:
        row.update(_measure(impl, h, w, t, g, device, timing))
    except OOM as e:
        row.update(status="oom", error=str(e).splitlines()[0][:500])
    free_memory(device)
    if row["status"] == "ok":
        row["tflops_total"] = row["flops_total"] / (row["ms_total"] * 1e-3) / 1e12
    return row


def add_ratios(rows: list[dict]) -> None:
    """On our rows: time and peak-memory ratios ours / peer (< 1 means ours is faster / smaller)."""
    for ours in (r for r in rows if r["impl"] == "ours" and r["status"] == "ok"):
        for peer in rows:
            if peer["op"] != ours["op"] or peer["impl"] == "ours" or peer["status"] != "ok":
                continue
            ours[f"time_ratio_vs_{peer['impl']}"] = ours["ms_total"] / peer["ms_total"]
            if ours["peak_mem_bytes"] is not None and peer["peak_mem_bytes"]:
                ours[f"mem_ratio_vs_{peer['impl']}"] = ours["peak_mem_bytes"] / peer["peak_mem_bytes"]


def check_targets(rows: list[dict], device: torch.device) -> None:
    lo, hi = TARGET_POINT["vocab"]
    points = [r for r in rows if r["impl"] == "ours" and r["op"] == "cross_entropy"
              and r["tokens"] == TARGET_POINT["tokens"] and r["hidden"] == TARGET_POINT["hidden"]
              and lo <= r["vocab"] <= hi and r["dtype"] == TARGET_POINT["dtype"]]
    if device.type != "cuda" or not points:
        print("TARGETS: not evaluated (they need 16k tokens, hidden 4096, vocab 128k, bf16 on a GPU)")
        return
    for r in points:
        where = f"cross entropy N={r['tokens']} H={r['hidden']} V={r['vocab']} bf16"
        r["targets"] = [
            verdict(f"{where} peak memory ours/eager", r.get("mem_ratio_vs_eager"), TARGET_MEM_RATIO_VS_EAGER, False),
            verdict(f"{where} fwd+bwd time ours/eager", r.get("time_ratio_vs_eager"), TARGET_TIME_RATIO_VS_EAGER,
                    False),
            verdict(f"{where} fwd+bwd time ours/liger", r.get("time_ratio_vs_liger"), TARGET_TIME_RATIO_VS_LIGER,
                    False),
        ]


def plot(rows: list[dict], path: Path, axis: str) -> None:
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no plot")
        return
    other = "tokens" if axis == "vocab" else "vocab"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (op, impl, fixed) in dict.fromkeys((r["op"], r["impl"], r[other]) for r in rows):
        pts = [r for r in rows if (r["op"], r["impl"], r[other]) == (op, impl, fixed) and r["status"] == "ok"]
        if not pts:
            continue
        label = f"{op}: {impl} ({other} {fixed})"
        style = {"marker": "o", "linestyle": "-" if op == "cross_entropy" else "--",
                 "linewidth": 2.5 if impl == "ours" else 1.2}
        axes[0].plot([r[axis] for r in pts], [r["ms_total"] for r in pts], label=label, **style)
        if pts[0]["peak_mem_bytes"] is not None:
            axes[1].plot([r[axis] for r in pts], [r["peak_mem_bytes"] / 2**30 for r in pts], label=label, **style)
    for ax, ylabel in zip(axes, ("fwd+bwd ms", "peak memory above inputs, GiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    r0 = rows[0]
    fig.suptitle(f"LM-head cross entropy, hidden {r0['hidden']}, {r0['dtype']}, {r0['device']} ({r0['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


TABLE = [("op", "op", ""), ("impl", "impl", ""), ("N", "tokens", ""), ("V", "vocab", ""), ("H", "hidden", ""),
         ("fwd ms", "ms_fwd", ".3f"), ("bwd ms", "ms_bwd", ".3f"), ("tot ms", "ms_total", ".3f"),
         ("TF/s", "tflops_total", ".1f"), ("peak MiB", "peak_mib", ".0f"), ("err", "max_abs_err", ".1e"),
         ("t/eager", "time_ratio_vs_eager", ".2f"), ("mem/eager", "mem_ratio_vs_eager", ".3f"),
         ("t/compile", "time_ratio_vs_torch_compile", ".2f"), ("t/liger", "time_ratio_vs_liger", ".2f"),
         ("t/ref", "time_ratio_vs_ref", ".2f"), ("mem/ref", "mem_ratio_vs_ref", ".3f"),
         ("status", "status_short", "")]


def _printable(row: dict) -> dict:
    return {**row, "peak_mib": row["peak_mem_bytes"] / 2**20 if row.get("peak_mem_bytes") is not None else None,
            "status_short": row["status"][:60]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int_list, default=int_list("32k,64k,128k,256k"))
    p.add_argument("--tokens", type=int_list, default=int_list("16k"))
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile baseline")
    add_run_args(p, "CPU seconds-long run: fp32, 48 tokens, hidden 32, vocab 301")
    args = p.parse_args()

    device = bench_device()
    if args.smoke:
        # One point: the interpreter takes ~0.5 s per kernel launch of 64 rows.
        args.tokens, args.vocab, args.hidden, args.dtype = [48], [301], 32, "fp32"
        args.warmup_ms, args.rep_ms = 0.0, 0.0
    dtype = dtype_from_name(args.dtype)
    timing = {"warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "min_reps": 1 if args.smoke else 5}
    impls = implementations(args.smoke, args.compile)
    axis = "tokens" if len(args.tokens) > len(args.vocab) else "vocab"
    results = Results("cross_entropy", stamp(device, ("liger_kernel",)), args.out or default_out_dir(), args.smoke)
    print(f"cross_entropy on {results.stamp['device']}: torch {results.stamp['torch']}, "
          f"triton {results.stamp['triton']}, impls {[f'{i.op}:{i.name}' for i in impls]}, {args.dtype}, "
          f"hidden {args.hidden}, tokens {args.tokens}, vocab {args.vocab}")

    start = time.perf_counter()
    points = [(n, v) for n in args.tokens for v in args.vocab]
    for i, (tokens, vocab) in enumerate(points):
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            print(f"time budget of {args.budget_s:.0f} s spent: skipped {len(points) - i} points: {points[i:]}")
            break
        h, w, t, g = make_inputs(tokens, vocab, args.hidden, dtype, device)
        rows = []
        for impl in impls:
            rows.append(results.add(measure(impl, h, w, t, g, device, timing)))
            r = _printable(rows[-1])
            peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} MiB"
            print(f"  {r['op'] + ':' + r['impl']:>24} N={tokens:<6} V={vocab:<7} "
                  + (f"fwd {r['ms_fwd']:.3f} ms total {r['ms_total']:.3f} ms {r['tflops_total']:.1f} TFLOP/s "
                     f"peak {peak}" if r["status"] == "ok" else r["status"]), flush=True)
        del h, w, t, g
        free_memory(device)
        add_ratios(rows)
    check_targets(results.rows, device)
    results.save()
    print()
    print_table([_printable(r) for r in results.rows], TABLE)
    print(f"wrote {results.json_path}")
    if results.rows:
        plot(results.rows, results.png_path, axis)


if __name__ == "__main__":
    main()
