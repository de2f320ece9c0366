"""Generation speed: llmsys's KV-cache ``generate`` vs ``transformers`` ``generate`` on the same weights and prompts.

One model, built by llmsys with a seeded random init, is exported with ``llmsys.models.hf.save_hf`` (the
writer behind ``export_hf``) and loaded back by ``transformers.LlamaForCausalLM.from_pretrained``, so both
sides decode identical weights; the logits of both on the first prompt are compared first
(``logits_max_abs_diff`` in every row). Each batch size is one point with the same prompts for every
implementation: random token ids, lengths drawn in ``--prompt-lens`` (default 32..64), right-padded by
llmsys's ``generate`` as it always does, left-padded with an ``attention_mask`` for transformers (its
convention); only the generated tokens are counted and compared.

Exactly ``--new-tokens`` tokens per sequence on both sides, greedy: llmsys gets ``eos_id=None`` (nothing
stops a sequence); transformers gets a fresh ``GenerationConfig(do_sample=False, eos_token_id=None,
max_new_tokens=N)`` and the export has no EOS in its config, so no stopping criterion but the length
exists and no logits processor touches the scores (``min_new_tokens`` would mask an EOS logit and could
change the argmax). Both counts are checked on the outputs; a shortfall stops the script.

Implementations (``--impls``):

- ``llmsys``: ``generate`` with its KV cache, eager (``Transformer.decode`` every step);
- ``llmsys_static``: ``generate(decoder=StaticDecoder(mode="eager"))``: the preallocated cache and
  sync-free step, uncompiled (isolates what the static cache alone buys);
- ``llmsys_compile``: ``StaticDecoder(mode="compile")``: ``torch.compile`` of the step (CUDA:
  ``mode="reduce-overhead"``, CUDA graphs; CPU: inductor's C++ kernels); compile time is ``setup_s``;
- ``llmsys_cuda_graph`` (CUDA only): ``StaticDecoder(mode="cuda_graph")``, the eager step captured once;
- ``transformers``: ``generate`` with its default (dynamic) cache;
- ``transformers_static``: ``generate(cache_implementation="static")`` (on CUDA transformers then
  compiles its decoding forward itself, in the untimed warm-up call).

Per point (batch size): every implementation is set up (``setup_s``: the StaticDecoder, compilation
included) and makes one untimed warm-up call (``warmup_s``: transformers' own compilation with a static
cache), then the timed calls go round-robin over the implementations, ``--reps`` rounds of
``--new-tokens`` tokens, then ``--reps`` rounds of one token, so a load drifting on a shared CPU weighs on
all alike: ``tokens_per_s`` = B x new tokens / median wall time of a whole call (prefill included),
``ttft_ms`` = median time to first token (prefill + first sample). A device synchronise closes every
timed call. The JSON is rewritten after every point; ``--budget-s`` starts no new implementation or
point after that many seconds from the start (the model build and export included).

``greedy_match`` = fraction of sequences whose tokens all equal the ``llmsys`` row's of the same batch,
``greedy_prefix_match`` = mean fraction of tokens before the first difference: float noise between two
implementations can flip a rare near-tie of the argmax, and every token after a flip differs. Our rows
carry ``speedup_vs_<peer>`` = our tokens/s / peer tokens/s (> 1: ours is faster), for ``transformers`` and
``transformers_static``.

Model (``--model``): ``cpu`` = the issue's CPU shape (Llama, hidden 256, 4 layers, 4 heads, 2 kv heads,
FFN 688, vocab 8192, untied, fp32), ``1b`` = a ~1.1B Llama (hidden 2048, 16 layers, 16 heads, 8 kv heads,
FFN 5632, vocab 32000, bf16), ``smoke`` = tiny. Default: ``1b`` on a GPU, ``cpu`` on the CPU.

Target (printed PASS / FAIL, never an exit status; GPU only): our best tokens/s >= 2x ``transformers``
``generate`` at batch 64.

    python benchmarks/generation.py --smoke          # CPU, tiny model, seconds
    python benchmarks/generation.py                  # CPU: the issue's shape, batch 1, 16, 64, 128 new tokens
    python benchmarks/generation.py --batches 64,16,1 --budget-s 60     # GPU: 1B bf16, target batch first

Results: ``generation-<device>-<date>[-smoke].json`` (+ ``.png`` with matplotlib) in $OUT or benchmarks/results/.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    OOM, Results, bench_device, default_out_dir, dtype_from_name, free_memory, int_list, print_table, pyplot, stamp,
    synchronize, verdict,
)
from llmsys.config import ModelConfig  # noqa: E402
from llmsys.models import Transformer, count_parameters, save_hf  # noqa: E402
from llmsys.models.generation import StaticDecoder, generate  # noqa: E402

MODELS = {
    "smoke": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=512),
    "cpu": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=688, vocab_size=8192),
    "1b": dict(dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn_dim=5632, vocab_size=32000),
}
DEFAULT_DTYPE = {"smoke": "fp32", "cpu": "fp32", "1b": "bf16"}
OURS = ("llmsys", "llmsys_static", "llmsys_compile", "llmsys_cuda_graph")
PEERS = ("transformers", "transformers_static")
# Cheap implementations first, the ones that compile last: a --budget-s cut drops those first.
DEFAULT_IMPLS = {"cuda": ("transformers", "llmsys", "llmsys_cuda_graph", "llmsys_static", "transformers_static",
                          "llmsys_compile"),
                 "cpu": ("transformers", "llmsys", "llmsys_static", "llmsys_compile")}
SMOKE_IMPLS = ("transformers", "llmsys", "llmsys_static")
TARGET_SPEEDUP = 2.0
TARGET_BATCH = 64
SEED = 0


@dataclass
class Prompts:
    ids: list[list[int]]  # what llmsys's generate takes (it right-pads)
    hf_ids: torch.Tensor  # (B, T) the same ids left-padded with PAD_ID, for transformers
    hf_mask: torch.Tensor  # (B, T) 1 on real tokens


PAD_ID = 0  # never attended to on either side; prompts are drawn from 1..vocab-1


def make_prompts(batch: int, lens: tuple[int, int], vocab: int, device: torch.device) -> Prompts:
    rng = random.Random(SEED * 1000 + batch)
    ids = [[rng.randrange(1, vocab) for _ in range(rng.randint(*lens))] for _ in range(batch)]
    width = max(map(len, ids))
    hf_ids = torch.full((batch, width), PAD_ID, dtype=torch.long)
    hf_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, p in enumerate(ids):
        hf_ids[row, width - len(p):] = torch.tensor(p)
        hf_mask[row, width - len(p):] = 1
    return Prompts(ids, hf_ids.to(device), hf_mask.to(device))


def build_models(name: str, dtype: torch.dtype, device: torch.device, max_len: int, tmp: Path):
    """The llmsys model (seeded random init on the device) and transformers' load of its Hugging Face export."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the weight-loading bar would clutter the log
    cfg = ModelConfig(**MODELS[name], max_seq_len=max_len, tie_embeddings=False)
    torch.manual_seed(SEED)
    with torch.device(device):
        ours = Transformer(cfg).to(dtype).eval()
    hf_dir = save_hf(ours.state_dict(), cfg, tmp / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    return cfg, ours, hf


@torch.no_grad()
def logits_gap(ours: Transformer, hf, prompt: list[int], device: torch.device) -> float:
    ids = torch.tensor([prompt], device=device)
    return (ours(ids).float() - hf(ids).logits.float()).abs().max().item()


@dataclass
class Runner:
    """One implementation at one batch: ``call(n)`` generates n tokens per prompt, returns (B, n) ids."""

    setup_s: float
    call: Callable[[int], torch.Tensor]


def make_runner(impl: str, ours: Transformer, hf, prompts: Prompts, new_tokens: int) -> Runner:
    import transformers

    t0 = time.perf_counter()
    if impl in OURS:
        decoder = None
        if impl != "llmsys":
            mode = impl.removeprefix("llmsys_").replace("static", "eager")
            width = max(map(len, prompts.ids))
            decoder = StaticDecoder(ours, len(prompts.ids), width + new_tokens, mode=mode)

        def call(n: int) -> torch.Tensor:
            out = generate(ours, prompts.ids, n, temperature=0.0, eos_id=None, decoder=decoder)
            if not bool((out.lengths == n).all()):
                raise RuntimeError(f"{impl}: generated {out.lengths.tolist()} tokens, expected {n} each")
            return out.tokens
    else:
        cache = "static" if impl == "transformers_static" else None

        def call(n: int) -> torch.Tensor:
            config = transformers.GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None,
                                                   pad_token_id=PAD_ID, cache_implementation=cache)
            out = hf.generate(input_ids=prompts.hf_ids, attention_mask=prompts.hf_mask, generation_config=config)
            new = out[:, prompts.hf_ids.shape[1]:]
            if new.shape[1] != n:
                raise RuntimeError(f"{impl}: generated {new.shape[1]} tokens, expected {n}")
            return new
    return Runner(time.perf_counter() - t0, call)


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def measure_batch(impls: list[str], ours: Transformer, hf, prompts: Prompts, new_tokens: int, reps: int,
                  device: torch.device, out_of_time: Callable[[], bool]) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Rows of one batch. Every implementation is set up and warmed up first (none starts once
    ``out_of_time()``), then the timed calls go round-robin over them, rep by rep, so a load that drifts
    during the point (a shared CPU) weighs on all of them alike rather than on whichever ran last."""
    B = len(prompts.ids)
    base = {"batch": B, "new_tokens": new_tokens, "prompt_tokens": sum(map(len, prompts.ids))}
    rows, runners, times, ttfts, outputs = {}, {}, {}, {}, {}

    def attempt(fn: Callable[[str], None], impl: str) -> None:
        try:
            fn(impl)
        except OOM as e:
            rows[impl].update(status="oom", error=str(e).splitlines()[0][:500])
            runners.pop(impl, None)
            free_memory(device)

    def setup(impl: str) -> None:
        runners[impl] = make_runner(impl, ours, hf, prompts, new_tokens)
        rows[impl]["setup_s"] = runners[impl].setup_s
        rows[impl]["warmup_s"], _ = timed(lambda: runners[impl].call(new_tokens), device)

    def full(impl: str) -> None:
        seconds, outputs[impl] = timed(lambda: runners[impl].call(new_tokens), device)
        times[impl].append(seconds)

    def first(impl: str) -> None:
        ttfts[impl].append(timed(lambda: runners[impl].call(1), device)[0])

    for impl in impls:
        if out_of_time():
            break
        rows[impl], times[impl], ttfts[impl] = {"impl": impl, **base, "status": "ok"}, [], []
        attempt(setup, impl)
    for step in (full, first):
        for _ in range(reps):
            for impl in list(runners):
                attempt(step, impl)
    for impl in runners:
        r = rows[impl]
        r.update(seconds=statistics.median(times[impl]), seconds_all=times[impl],
                 ttft_ms=statistics.median(ttfts[impl]) * 1e3)
        r["tokens_per_s"] = B * new_tokens / r["seconds"]
    runners.clear()
    free_memory(device)
    return list(rows.values()), {impl: t.cpu() for impl, t in outputs.items() if rows[impl]["status"] == "ok"}


def match(tokens: torch.Tensor, reference: torch.Tensor) -> dict:
    """Whole-sequence and prefix agreement of greedy outputs (B, N)."""
    same = tokens == reference
    prefix = torch.where(same.all(1), same.shape[1], (~same).int().argmax(1))  # first difference, else N
    return {"greedy_match": same.all(1).float().mean().item(),
            "greedy_prefix_match": (prefix.float() / same.shape[1]).mean().item()}


def add_comparisons(rows: list[dict], outputs: dict[str, torch.Tensor]) -> None:
    by_impl = {r["impl"]: r for r in rows if r["status"] == "ok"}
    if "llmsys" in outputs:
        for r in by_impl.values():
            if r["impl"] != "llmsys" and r["impl"] in outputs:
                r.update(match(outputs[r["impl"]], outputs["llmsys"]))
    for r in by_impl.values():
        if r["impl"] in OURS:
            for peer in PEERS:
                if peer in by_impl:
                    r[f"speedup_vs_{peer}"] = r["tokens_per_s"] / by_impl[peer]["tokens_per_s"]


def check_targets(rows: list[dict], device: torch.device) -> None:
    ours = [r for r in rows if r["impl"] in OURS and r["batch"] == TARGET_BATCH and r.get("speedup_vs_transformers")]
    if device.type != "cuda" or not ours:
        print(f"TARGETS: not evaluated (they need our rows and transformers' at batch {TARGET_BATCH} on a GPU)")
        return
    best = max(ours, key=lambda r: r["tokens_per_s"])
    best["targets"] = [verdict(f"generation B={TARGET_BATCH} best of ours ({best['impl']}) vs transformers generate",
                               best["speedup_vs_transformers"], TARGET_SPEEDUP, higher_is_better=True)]


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no plot")
        return
    ok = [r for r in rows if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for impl in dict.fromkeys(r["impl"] for r in ok):
        pts = sorted((r for r in ok if r["impl"] == impl), key=lambda r: r["batch"])
        style = dict(marker="o", label=impl, linewidth=2.5 if impl in OURS else 1.2,
                     linestyle="-" if impl in OURS else "--")
        axes[0].plot([r["batch"] for r in pts], [r["tokens_per_s"] for r in pts], **style)
        axes[1].plot([r["batch"] for r in pts], [r["ttft_ms"] for r in pts], **style)
    for ax, label in zip(axes, ("generated tokens/s", "time to first token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    r0 = rows[0]
    fig.suptitle(f"generation, {r0['model']} ({r0['params'] / 1e6:.0f}M, {r0['dtype']}), {r0['new_tokens']} new "
                 f"tokens, greedy, {r0['device']} ({r0['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


TABLE = [("impl", "impl", ""), ("B", "batch", ""), ("tok/s", "tokens_per_s", ".1f"), ("ttft ms", "ttft_ms", ".1f"),
         ("setup s", "setup_s", ".1f"), ("x hf", "speedup_vs_transformers", ".2f"),
         ("x hf static", "speedup_vs_transformers_static", ".2f"), ("greedy", "greedy_match", ".3f"),
         ("prefix", "greedy_prefix_match", ".3f"), ("status", "status", "")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default=None, help="default: 1b on a GPU, cpu on the CPU")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 for 1b, else fp32)")
    p.add_argument("--batches", type=int_list, default=int_list("1,16,64"))
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-lens", default="32,64", help="min,max prompt length (tokens), drawn uniformly")
    p.add_argument("--impls", default=None, help=f"comma-separated subset of {','.join(OURS + PEERS)}")
    p.add_argument("--reps", type=int, default=3, help="timed calls per point (median), for tokens/s and for TTFT")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="stop starting new points after this many seconds (0: no limit); the JSON keeps what ran")
    p.add_argument("--smoke", action="store_true", help="CPU seconds-long run: tiny model, B 1/3, 8 new tokens")
    p.add_argument("--out", type=Path, default=None, help="default: $OUT, else benchmarks/results/")
    args = p.parse_args()

    device = bench_device()
    if args.smoke:
        args.model, args.batches, args.new_tokens, args.prompt_lens, args.reps = "smoke", [1, 3], 8, "4,9", 1
        args.impls = args.impls or ",".join(SMOKE_IMPLS)
    model_name = args.model or ("1b" if device.type == "cuda" else "cpu")
    dtype = dtype_from_name(args.dtype or DEFAULT_DTYPE[model_name])
    impls = args.impls.split(",") if args.impls else list(DEFAULT_IMPLS[device.type])
    unknown = set(impls) - set(OURS + PEERS)
    if unknown:
        raise SystemExit(f"unknown --impls {sorted(unknown)}; known: {list(OURS + PEERS)}")
    if "llmsys_cuda_graph" in impls and device.type != "cuda":
        raise SystemExit("--impls llmsys_cuda_graph needs a CUDA device")
    lens = tuple(int_list(args.prompt_lens))
    if len(lens) != 2 or not 1 <= lens[0] <= lens[1]:
        raise SystemExit(f"--prompt-lens must be min,max with 1 <= min <= max, got {args.prompt_lens!r}")
    if args.new_tokens < 1 or args.reps < 1:
        raise SystemExit("--new-tokens and --reps must be >= 1")

    results = Results("generation", stamp(device, optional=("transformers",)), args.out or default_out_dir(),
                      args.smoke)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg, ours, hf = build_models(model_name, dtype, device, lens[1] + args.new_tokens, Path(tmp))
    build_s = time.perf_counter() - start
    first = make_prompts(1, lens, cfg.vocab_size, device).ids[0]
    common = {"model": model_name, "params": count_parameters(cfg)["total"], "dtype": str(dtype).removeprefix("torch."),
              "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.kv_heads,
              "ffn_dim": cfg.hidden_dim, "vocab_size": cfg.vocab_size, "prompt_lens": list(lens), "reps": args.reps,
              "logits_max_abs_diff": logits_gap(ours, hf, first, device),
              "hf_attn_implementation": hf.config._attn_implementation, "smoke": args.smoke}
    print(f"generation on {results.stamp['device']}: torch {results.stamp['torch']}, transformers "
          f"{results.stamp['transformers']}, model {model_name} ({common['params'] / 1e6:.1f}M, {common['dtype']}), "
          f"built and exported in {build_s:.1f} s; logits |ours - hf| <= {common['logits_max_abs_diff']:.2e}; "
          f"impls {impls}", flush=True)

    def out_of_time() -> bool:
        return bool(args.budget_s) and time.perf_counter() - start > args.budget_s

    for n, batch in enumerate(args.batches):
        if out_of_time():
            print(f"time budget of {args.budget_s:.0f} s spent: skipped batches {args.batches[n:]}")
            break
        prompts = make_prompts(batch, lens, cfg.vocab_size, device)
        rows, outputs = measure_batch(impls, ours, hf, prompts, args.new_tokens, args.reps, device, out_of_time)
        add_comparisons(rows, outputs)
        for r in rows:
            results.add({**r, **common})
            print(f"  {r['impl']:>20} B={batch:<3} " + (
                f"{r['tokens_per_s']:9.1f} tok/s  ttft {r['ttft_ms']:8.1f} ms  setup {r['setup_s']:.1f} s  "
                f"warm-up {r['warmup_s']:.1f} s" if r["status"] == "ok" else r["status"]), flush=True)
        skipped = [impl for impl in impls if impl not in {r["impl"] for r in rows}]
        if skipped:
            print(f"time budget of {args.budget_s:.0f} s spent: B={batch} without {skipped}")
    check_targets(results.rows, device)
    results.save()
    print()
    print_table(results.rows, TABLE)
    print(f"wrote {results.json_path}")
    if results.rows:
        plot(results.rows, results.png_path)


if __name__ == "__main__":
    main()
