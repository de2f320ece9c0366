"""Training throughput: tokens/s per device and MFU of `llmsys.train`, sweeping the model size.

Each point is a real training run (the same command users launch), timed by the trainer's own meter
(forward + backward + optimizer step; evaluation and checkpointing excluded). The first
``--warmup`` steps are dropped (allocator warm-up, kernel selection). MFU uses the PaLM formula
(6·N + 12·L·H·Q·T FLOPs per token, ``llmsys.models.flops_per_token``) against the device's dense
bf16 peak (``trainer.peak_tflops`` / the known-GPU table); on a CPU pass ``--peak-tflops`` to get one.

    python benchmarks/train_throughput.py --smoke                      # CPU, seconds
    python benchmarks/train_throughput.py --models llama-125m,llama-1b --nproc 8 --precision bf16 \
        --deepspeed zero2 --micro-batch 8 --seq-len 2048

Results: JSON rows in ``benchmarks/results/train_throughput-<device>-<date>.json`` (+ a PNG when
matplotlib is installed), each stamped with device, versions and date.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmsys.config import ModelConfig, config_dir  # noqa: E402
from llmsys.models import count_parameters, flops_per_token  # noqa: E402
from llmsys.trainers.observe import device_peak_tflops  # noqa: E402

SMOKE_MODEL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
               "model.max_seq_len=64", "data.bpe_vocab_size=512"]


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def versions() -> dict[str, str]:
    import deepspeed

    out = {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def run_point(model: str, args: argparse.Namespace, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        overrides = [
            f"model={model}", f"trainer.output_dir={out}", f"trainer.max_steps={args.steps}", "trainer.log_every=1",
            "trainer.eval_every=0", "trainer.save_every=0", f"trainer.precision={args.precision}",
            f"trainer.micro_batch_size={args.micro_batch}",
            f"trainer.global_batch_size={args.micro_batch * args.nproc * args.accumulation}",
            f"data.seq_len={args.seq_len}", f"deepspeed={args.deepspeed}", "logger.progress=false", *extra,
        ]
        if args.peak_tflops:
            overrides.append(f"trainer.peak_tflops={args.peak_tflops}")
        if args.nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
                   "-m", "llmsys.train", *overrides]
        else:
            cmd = [sys.executable, "-m", "llmsys.train", *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        final_cfg = json.loads((out / "final" / "config.json").read_text())["model"]
    steps = [r for r in rows if "loss" in r and r["step"] > args.warmup]
    if not steps:
        raise RuntimeError(f"no steps after the {args.warmup} warm-up steps; raise --steps")
    # Every row is one step of the same token count, so the aggregate rate is the harmonic mean.
    tps = len(steps) / sum(1.0 / r["tokens_per_sec"] for r in steps)
    mcfg = ModelConfig(**final_cfg)
    fpt = flops_per_token(mcfg, args.seq_len)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    peak = device_peak_tflops(device, args.peak_tflops)
    return {
        "bench": "train_throughput", "model": model, "params": count_parameters(mcfg)["total"],
        "seq_len": args.seq_len, "micro_batch": args.micro_batch, "world_size": args.nproc,
        "precision": args.precision, "deepspeed_config": args.deepspeed, "steps_timed": len(steps),
        "smoke": args.smoke,
        "tokens_per_sec": tps, "tokens_per_sec_per_device": tps / args.nproc, "flops_per_token": fpt,
        "tflops_per_device": tps * fpt / args.nproc / 1e12,
        "mfu": (tps * fpt / (peak * 1e12 * args.nproc)) if peak else None,
        "final_loss": steps[-1]["loss"],
    }


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([r["model"] for r in rows], [r["tokens_per_sec_per_device"] for r in rows])
    ax.set_ylabel("tokens/s per device")
    ax.set_title(f"llmsys training throughput ({rows[0]['device']}, {rows[0]['precision']})")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny", help="comma-separated configs/model names")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--deepspeed", default="zero0")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (CPUs have no table entry)")
    p.add_argument("--smoke", action="store_true", help="a seconds-long CPU run of a micro model (CI)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "benchmarks" / "results")))
    args = p.parse_args()

    extra: list[str] = []
    if args.smoke:
        args.models, args.steps, args.warmup, args.seq_len, args.micro_batch = "tiny", 8, 3, 32, 4
        extra = SMOKE_MODEL
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if not (config_dir() / "model" / f"{m}.yaml").is_file():
            p.error(f"unknown model {m!r}; see configs/model/")
    stamp = {"device": device_name(), **versions(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    rows = []
    for m in models:
        row = {**run_point(m, args, extra), **stamp}
        rows.append(row)
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] else "n/a"
        print(f"{m:>14}  {row['tokens_per_sec_per_device']:>12,.0f} tok/s/device  "
              f"{row['tflops_per_device']:.3f} TFLOP/s/device  MFU {mfu}")
    args.out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in stamp["device"]).strip("-").lower()
    name = f"train_throughput-{slug}-{stamp['date'][:10]}{'-smoke' if args.smoke else ''}"
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, args.out / f"{name}.png")
    print(f"wrote {args.out / (name + '.json')}")


if __name__ == "__main__":
    main()
