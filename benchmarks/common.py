"""Helpers shared by the kernel benchmarks (`attention.py`, `cross_entropy.py`).

Timing follows `triton.testing.do_bench`'s recipe (warm up for ~25 ms, then time ~100 ms of calls
one by one and report the median) with our own loop, because `do_bench` fails under Triton's CPU
interpreter: CUDA events around each call on a GPU, `time.perf_counter` after a synchronise on the
CPU. Peak memory is `torch.cuda.max_memory_allocated` above what was allocated before the call
(inputs excluded, outputs and gradients included); the CPU has no such counter and reports None.

Results: one JSON list of rows per run, rewritten after every point (a run killed by a timeout
keeps what it measured), named ``<subject>-<device-slug>-<date>[-smoke].json`` in ``$OUT`` when set,
else ``benchmarks/results/``; a PNG beside it when matplotlib is importable.
"""
from __future__ import annotations

import datetime as dt
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]

# The only failure a benchmark point expects from running out of device memory. torch defines the
# class on CPU builds too, so `except OOM` is valid everywhere (it is never raised on the CPU).
OOM = torch.cuda.OutOfMemoryError


def default_out_dir() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "benchmarks" / "results"


def bench_device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def optional_module(name: str):
    """The module, or None when it is not installed (the peers are optional)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def versions(optional: tuple[str, ...] = ()) -> dict[str, str | None]:
    import triton

    out: dict[str, str | None] = {
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None,
    }
    for name in optional:
        mod = optional_module(name)
        out[name] = getattr(mod, "__version__", "unknown") if mod is not None else None
    return out


def git_commit() -> str | None:
    """Short commit of the working tree, with "-dirty" when it has changes; None outside git."""
    try:
        proc = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=REPO,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def stamp(device: torch.device, optional: tuple[str, ...] = ()) -> dict:
    return {
        "device": device_name(device), **versions(optional), "git_commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def dtype_from_name(name: str) -> torch.dtype:
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(table)}")
    return table[name]


def int_list(text: str) -> list[int]:
    """'512,1k,16k' -> [512, 1024, 16384] (k = 1024)."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if item:
            out.append(int(item[:-1]) * 1024 if item.endswith("k") else int(item))
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Drop cached blocks after a point (above all after an OOM) so the next one starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
            min_reps: int = 3, max_reps: int = 1000) -> float:
    """Median wall time of one call of `fn` in milliseconds (device time on a GPU)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    estimate_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(min(max_reps, int(warmup_ms / estimate_ms))):
        fn()
    reps = max(min_reps, min(max_reps, int(rep_ms / estimate_ms)))
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        synchronize(device)
        for start, end in events:
            start.record()
            fn()
            end.record()
        synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated by one call of `fn` above what was allocated before it; None (no call) on the CPU."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


class Results:
    """The JSON rows of one run, rewritten after each point, and the plot at the end."""

    def __init__(self, subject: str, stamp_: dict, out_dir: Path, smoke: bool):
        self.subject, self.stamp, self.rows = subject, stamp_, []
        slug = "".join(c if c.isalnum() else "-" for c in stamp_["device"]).strip("-").lower()
        while "--" in slug:
            slug = slug.replace("--", "-")
        out_dir.mkdir(parents=True, exist_ok=True)
        self.base = out_dir / f"{subject}-{slug}-{stamp_['date'][:10]}{'-smoke' if smoke else ''}"

    @property
    def json_path(self) -> Path:
        return self.base.with_suffix(".json")

    @property
    def png_path(self) -> Path:
        return self.base.with_suffix(".png")

    def add(self, row: dict) -> dict:
        row = {"subject": self.subject, **row, **self.stamp}
        self.rows.append(row)
        self.save()
        return row

    def save(self) -> None:
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.rows, indent=2) + "\n")
        tmp.replace(self.json_path)  # atomic: a reader (or a kill) never sees half a file


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (it is not installed on every machine)."""
    if optional_module("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (header, row key, format spec); missing / None values print as '-'."""

    def cell(row, key, spec):
        value = row.get(key)
        if value is None:
            return "-"
        return format(value, spec) if spec else str(value)

    table = [[h for h, _, _ in columns]] + [[cell(r, k, s) for _, k, s in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for n, line in enumerate(table):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def verdict(name: str, got: float | None, need: float, higher_is_better: bool) -> dict:
    """One target check, printed as PASS / FAIL (never raises, never exits)."""
    if got is None:
        print(f"TARGET {name}: n/a (not measured)")
        return {"target": name, "need": need, "got": None, "pass": None}
    ok = got >= need if higher_is_better else got <= need
    op = ">=" if higher_is_better else "<="
    print(f"TARGET {name}: {got:.3f} (need {op} {need}) {'PASS' if ok else 'FAIL'}")
    return {"target": name, "need": need, "got": got, "pass": ok}


def add_run_args(parser, smoke_help: str) -> None:
    """The options every kernel benchmark shares: timing, time budget, the CI smoke run, output folder."""
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="stop starting new points after this many seconds (0: no limit); the JSON keeps what ran")
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--out", type=Path, default=None, help="default: $OUT, else benchmarks/results/")

