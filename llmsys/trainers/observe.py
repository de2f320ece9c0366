"""Pieces every trainer composes: the run directory, metrics (JSONL, progress bar, wandb), throughput/MFU.

Only rank 0 writes. Other ranks get the same objects with writing disabled, so the loops need no
``if rank == 0`` around each call.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from llmsys.config import Config, LoggerConfig, to_yaml

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"

# Peak dense (no sparsity) TFLOP/s per device from NVIDIA's data sheets, per part: an H100 PCIe is not an SXM.
# MFU is reported against these (PaLM's convention). Columns: "bf16" (fp16 is the same on every part here),
# "tf32" (fp32 matmuls on tensor cores) and "fp32" (CUDA cores). A part not listed, or a name that does not say
# which part it is, gets None (no MFU; set trainer.peak_tflops), never a neighbour's figure.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200 SXM": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100 SXM": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},  # SXM4 and PCIe alike
    "L40S": {"bf16": 362.05, "tf32": 183.0, "fp32": 91.6},
}
PRECISION_COLUMN = {"bf16": "bf16", "fp16": "bf16", "tf32": "tf32", "fp32": "fp32"}


def gpu_part(name: str) -> tuple[Optional[str], str]:
    """The PEAK_TFLOPS part a ``torch.cuda.get_device_name()`` names, or None and why.

    Matched on whole words of the name ("NVIDIA H100 80GB HBM3" -> H100, 80GB, HBM3), so a GH200 is not
    an H200 and an L40 is not an L40S. The names drivers report: "NVIDIA H200" / "NVIDIA H200 NVL",
    "NVIDIA H100 80GB HBM3" (SXM5) / "NVIDIA H100 PCIe" / "NVIDIA H100 NVL", "NVIDIA A100-SXM4-80GB",
    "NVIDIA A100 80GB PCIe", "NVIDIA L40S". A bare "NVIDIA H100" could be the SXM or the PCIe card: None.
    """
    words = set("".join(c if c.isalnum() else " " for c in name.upper()).split())
    if "H200" in words:
        return ("H200 NVL" if "NVL" in words else "H200 SXM"), name
    if "H100" in words:
        if "PCIE" in words:
            return "H100 PCIe", name
        if "NVL" in words:
            return "H100 NVL", name
        if words & {"SXM", "SXM5", "HBM3"}:
            return "H100 SXM", name
        return None, f"{name!r} does not say whether it is the SXM, PCIe or NVL part (their peaks differ)"
    for part in ("A100", "L40S"):
        if part in words:
            return part, name
    return None, f"{name!r} is not in llmsys.trainers.observe.PEAK_TFLOPS"


def peak_tflops_for(name: str, precision: str) -> tuple[Optional[float], str]:
    """Dense peak TFLOP/s of the GPU called ``name`` at ``precision`` (bf16, fp16, tf32, fp32), and its
    source: the part it was read for, or why there is none."""
    if precision not in PRECISION_COLUMN:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISION_COLUMN)}")
    part, why = gpu_part(name)
    if part is None:
        return None, why
    return PEAK_TFLOPS[part][PRECISION_COLUMN[precision]], f"PEAK_TFLOPS[{part!r}][{PRECISION_COLUMN[precision]!r}]"


def device_peak_tflops(device: torch.device, override: Optional[float], precision: str = "bf16") -> Optional[float]:
    """The per-device peak MFU is measured against: ``override`` when given, else the table's (None on a CPU
    or an unknown part, with a warning saying why on a GPU)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    peak, source = peak_tflops_for(torch.cuda.get_device_name(device), precision)
    if peak is None:
        log.warning("No MFU: %s; set trainer.peak_tflops to the part's dense %s peak", source, precision)
    return peak


def write_run_config(output_dir: Path, config: Config, extra_files: dict[str, str]) -> None:
    """Save the resolved config (and e.g. the DeepSpeed JSON) so the run can be reproduced."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(to_yaml(config))
    for name, text in extra_files.items():
        (output_dir / name).write_text(text)


class Throughput:
    """Tokens/s and MFU over the interval since the last report; pauses (eval, saving) are excluded."""

    def __init__(self, flops_per_token: int, peak_tflops: Optional[float], world_size: int):
        self.flops_per_token, self.peak_tflops, self.world_size = flops_per_token, peak_tflops, world_size
        self.tokens = 0
        self.seconds = 0.0
        self._start: Optional[float] = None

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self, tokens: int) -> None:
        """Count ``tokens`` (all ranks together) processed since :meth:`start`."""
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None
        self.tokens += tokens

    def report(self) -> dict[str, Optional[float]]:
        tps = self.tokens / self.seconds if self.seconds > 0 else 0.0
        mfu = None
        if self.peak_tflops:
            mfu = tps * self.flops_per_token / (self.peak_tflops * 1e12 * self.world_size)
        self.tokens, self.seconds = 0, 0.0
        return {"tokens_per_sec": tps, "tokens_per_sec_per_device": tps / self.world_size, "mfu": mfu}


class MetricsLogger:
    """metrics.jsonl (always), a live progress bar (TTY) or periodic lines (logs), and optional wandb."""

    def __init__(self, output_dir: Path, cfg: LoggerConfig, *, enabled: bool, total_steps: int,
                 start_step: int, run_config: dict[str, Any]):
        self.enabled = enabled
        self.path = output_dir / METRICS_FILE
        self._progress = None
        self._task = None
        self._wandb = None
        if not enabled:
            return
        self._truncate_after(start_step)
        if cfg.progress:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            console = Console(stderr=True)
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=console, disable=not console.is_terminal)
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, stats="")
            self._progress.start()
        if cfg.wandb and cfg.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_DIR", str(output_dir))
            self._wandb = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity,
                                     name=cfg.run_name or output_dir.name, dir=str(output_dir),
                                     mode=cfg.wandb_mode, config=run_config, resume="allow",
                                     id=_wandb_id(output_dir))

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the file reads as one uninterrupted run."""
        if not self.path.exists():
            return
        if step == 0:
            self.path.unlink()
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, row: dict[str, Any], *, echo: bool = True) -> None:
        if not self.enabled:
            return
        row = {k: finite_or_none(v) for k, v in row.items() if v is not None}
        shown = row
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # This rank's allocator peak so far: what a GPU run really needed (the stages benchmark reads it).
            row = {**row, "gpu_max_allocated_bytes": torch.cuda.max_memory_allocated()}
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        if echo:
            text = "  ".join(_fmt(k, v) for k, v in shown.items())
            if self._progress is not None and self._progress.console.is_terminal:
                self._progress.console.print(text)
            else:
                print(text, file=sys.stderr, flush=True)

    def advance(self, step: int, stats: dict[str, Any]) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step,
                                  stats="  ".join(_fmt(k, v) for k, v in stats.items() if v is not None))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._wandb is not None:
            self._wandb.finish()


def finite_or_none(value: Any) -> Any:
    """A metric as JSON can hold it: NaN and infinities (a diverged step), also inside lists and dicts,
    become None, written as null (``json.dumps`` would write the bare ``NaN`` no strict JSON reader takes)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def _wandb_id(output_dir: Path) -> str:
    # Deterministic per run directory, so a resumed run continues the same W&B run.
    import hashlib

    return hashlib.sha1(str(output_dir.resolve()).encode()).hexdigest()[:16]


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key == "lr":
            return f"{key}={value:.2e}"
        if key == "mfu":
            return f"{key}={100 * value:.1f}%"
        if key.startswith("tokens_per_sec") or key == "tok/s":
            return f"{key}={value:,.0f}"
        return f"{key}={value:.4f}"
    return f"{key}={value}"


class SampleLog:
    """``samples.jsonl``: a few decoded generations per step with their scores, to read what the policy
    does (reward hacking shows here first). Rank 0 writes; a run from step 0 starts the file afresh."""

    def __init__(self, output_dir: Path, *, enabled: bool, start_step: int):
        self.path, self.enabled = output_dir / SAMPLES_FILE, enabled
        if enabled and start_step == 0:
            self.path.unlink(missing_ok=True)

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self.enabled and rows:
            with self.path.open("a") as f:
                f.writelines(json.dumps({k: finite_or_none(v) for k, v in row.items()}, allow_nan=False) + "\n"
                             for row in rows)
