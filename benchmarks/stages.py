"""The stages benchmark: tokens/s per device, MFU, peak memory and scaling of every `llmsys.train` stage.

Each point is a real ``python -m llmsys.train stage=...`` process (alone, under ``torchrun`` on the CPU
with gloo, or under the ``deepspeed`` launcher on GPUs), the same command users launch, and everything is
read back from what the trainer writes (``metrics.jsonl``, ``config.yaml``, ``final/config.json``): the
trainers get no benchmark code. One axis is swept at a time (``--sweep``, several may be given):

- ``stages``  every stage once at the base settings (the README's table);
- ``zero``    ZeRO stage 0..3;
- ``kernels`` ``model.attention`` / ``model.loss`` choices (and the llmsys._C ops) that exist on the device;
- ``size``    model presets (``configs/model``);
- ``world``   1..N processes, per-device batch fixed: weak scaling efficiency = per-device tokens/s at N
  over that at 1.

**Tokens are real tokens, never padding**, counted over all ranks by replaying the trainer's data order
(a pure function of seed and step) on the run's own data cache:

- pretrain: every position of the dense blocks (``micro_batch x seq_len`` per micro-batch);
- sft: every token of the packed examples, prompt and template tokens included (packing adds no padding);
- reward, dpo: the chosen and the rejected row of each pair, prompt + response each, without the right
  padding ``collate_pairs`` adds to the longest row of the micro-batch;
- ppo, grpo: prompt + generated tokens of every rollout row (the rows training runs on); generated
  tokens/s counts the responses alone, over the generation time.

The LM loop logs ``tokens`` = rank 0's ``input_ids.numel()`` times the world size (padding included, and
rank 0's packed length standing for every rank's); the replay recomputes exactly that number too and the
point fails if the two disagree, so the real count is known to follow the trainer's data. Rows keep the
trainer's figure beside ours (``trainer_tokens_per_sec_per_device``, ``real_over_trainer_tokens``: below 1
is padding; at several ranks it also moves with how far rank 0's share differs from the mean). Time per step is
the trainer's own meter (``tokens / tokens_per_sec``: forward + backward + optimizer step, evaluation and
checkpoints excluded); PPO/GRPO iterations are the intervals between their metric rows (``elapsed``), with
the trainer's ``generation_time`` / ``score_time`` / ``train_time`` as the split. The first ``--warmup``
steps (``--rl-warmup`` iterations) are dropped.

**MFU** is PaLM's: real tokens x ``llmsys.models.flops_per_token`` (6 N + 12 L H Q T at ``data.seq_len``;
a scalar-head model without the vocabulary matmul) over the peak of the precision used, for the exact
part: the table in ``llmsys.trainers.observe`` holds dense bf16 peaks of SXM parts, so fp32 on a GPU, a
PCIe/NVL part or a CPU gets an MFU only with ``--peak-tflops``. PPO/GRPO count the model FLOPs of all
three phases (generation: one forward per prompt and generated token; scoring: a forward of each model
that scores; training: forward + backward of each trained model per epoch) over the whole iteration, and
``mfu_train`` over the training phase alone.

**Memory**: CPU: peak RSS of the whole process tree (launcher and every rank, summed) and of the largest
single process, sampled every ``RSS_INTERVAL_S`` with psutil. GPU: ``peak_gpu_allocated_bytes`` is rank 0's
allocator peak (``torch.cuda.max_memory_allocated``, which the trainers log as ``gpu_max_allocated_bytes``);
``peak_gpu_used_bytes`` is what ``nvidia-smi`` reports for the tree's processes (allocator cache and CUDA
context included).

    python benchmarks/stages.py --smoke                              # CI: every stage tiny + world 1, 2 (CPU)
    python benchmarks/stages.py --sweep stages,world --world 1,2     # CPU: gloo processes under torchrun
    python benchmarks/stages.py --sweep stages,zero,world --models llama-1b --precision bf16 --world 1,2,4,8
    python benchmarks/stages.py --sweep size --models tiny,llama-125m,llama-1b --axis-stages pretrain,sft

Results: JSON rows ``stages-<device>-<date>[-smoke].json`` (rewritten after every point, stamped like
the kernel benchmarks; our rows carry ``"impl": "llmsys"``) and one PNG per sweep,
``stages-<device>-<date>[-smoke]-<sweep>.png``. ``--peers`` runs ``benchmarks/peers.py`` (a plain PyTorch
loop and TRL beside llmsys, SFT and DPO, ratios within each round) in the same invocation: its rows join
ours (``sweep`` "peers"), and its median ratios land on our stages-sweep rows as ``ratio_vs_plain`` /
``ratio_vs_trl``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import Results, bench_device, default_out_dir, print_table, pyplot, stamp, verdict  # noqa: E402
from llmsys.config import Config, ModelConfig, config_dir, register  # noqa: E402
from llmsys.data import BlockSampler, load_preference_data, load_prompts, load_sft_data, load_tokenizer  # noqa: E402
from llmsys.models import count_parameters, flops_per_token  # noqa: E402
from llmsys.trainers.observe import peak_tflops_for  # noqa: E402

STAGES = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo")
ONLINE = ("ppo", "grpo")
SWEEPS = ("stages", "zero", "kernels", "size", "world")
# The embedded data of each stage (the pipeline recipes' choices; GRPO's default reward is the exact answer).
STAGE_DATA = {"pretrain": "shakespeare", "sft": "chat", "reward": "prefs", "dpo": "prefs", "ppo": "prefs",
              "grpo": "arith"}
# The exports a stage starts from (model.init_from, ppo.reward_model); made once per architecture.
NEEDS = {"pretrain": (), "sft": ("pretrain",), "reward": ("sft",), "dpo": ("sft",), "ppo": ("sft", "reward"),
         "grpo": ("sft",)}
TOKENS_COUNTED = {
    "pretrain": "every position of the dense blocks (micro_batch x seq_len)",
    "sft": "every token of the packed examples, prompt and template included (packing adds no padding)",
    "reward": "chosen + rejected rows, prompt + response each, padding excluded",
    "dpo": "chosen + rejected rows, prompt + response each, padding excluded",
    "ppo": "prompt + generated tokens of every rollout row, padding excluded",
    "grpo": "prompt + generated tokens of every rollout row, padding excluded",
}
# Kernel choices, each one change from the base (sdpa attention, eager loss, torch ops).
KERNELS = {
    "sdpa": [],
    "triton": ["model.attention=triton"],
    "flash_attn": ["model.attention=flash_attn"],
    "fused_loss": ["model.loss=fused"],
    "fused_ops": ["model.norm=fused", "model.rope=fused", "model.mlp=fused"],
}
# A micro model for the CI smoke run: every stage trains for real, in seconds (train_throughput.py's).
SMOKE_MODEL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
               "model.max_seq_len=64", "data.bpe_vocab_size=512"]
# Every 50 ms: a short-lived allocation peak can fall between samples, so the figure is a lower bound.
RSS_INTERVAL_S = 0.05
GPU_MEM_INTERVAL_S = 1.0  # nvidia-smi is a process launch per sample
# What a run that ran out of GPU memory prints (torch.cuda.OutOfMemoryError's message): the one failure a
# point expects (a size sweep's largest model); recorded as status "oom", the sweep goes on.
OOM_MARKS = ("torch.OutOfMemoryError", "CUDA out of memory")
# Targets (issue 14) on an H100/H200, bf16: printed, never an exit status.
MFU_TARGETS = {"pretrain": 0.45, "sft": 0.40, "dpo": 0.40}


@dataclass(frozen=True)
class Point:
    """One run: the stage and the settings the sweeps vary; everything else comes from the flags."""

    stage: str
    model: str
    world: int = 1
    zero: int = 0
    kernels: str = "sdpa"


class RunOOM(RuntimeError):
    """A run that ran out of device memory."""


@dataclass
class Measured:
    """What a finished run leaves: its directory, metrics rows, config and memory samples."""

    run_dir: Path
    metrics: list[dict]
    config: Config
    wall_s: float
    memory: dict


# -- launching ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(world: int, overrides: list[str], args: argparse.Namespace, port: int) -> tuple[list[str], str]:
    """The command of one run and the launcher's name: python alone, torchrun (CPU, gloo), deepspeed (GPUs)."""
    if world == 1 and args.nodes == 1:
        return [sys.executable, "-m", "llmsys.train", *overrides], "python"
    launcher = args.launcher if args.launcher != "auto" else ("deepspeed" if torch.cuda.is_available() else "torchrun")
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                "--master_port", str(port), "-m", "llmsys.train", *overrides], launcher
    per_node = world // args.nodes
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(per_node), "--master_port", str(port)]
    if args.hostfile:
        cmd += ["--hostfile", str(args.hostfile), "--num_nodes", str(args.nodes)]
    return [*cmd, "--no_local_rank", "--module", "llmsys.train", *overrides], launcher


class TreeMemory:
    """Peak memory of a process and all its descendants, sampled on a thread while it runs: RSS (psutil),
    summed over the tree and of its largest process, and on GPUs what nvidia-smi reports per process."""

    def __init__(self, pid: int, gpu: bool):
        self.root = psutil.Process(pid)
        self.gpu = gpu and shutil.which("nvidia-smi") is not None
        self.peak_total = self.peak_single = self.samples = 0
        self.peak_gpu: Optional[int] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _run(self) -> None:
        last_gpu = 0.0
        while not self._stop.is_set():
            procs, total = self._tree(), 0
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += rss
                self.peak_single = max(self.peak_single, rss)
            self.peak_total = max(self.peak_total, total)
            self.samples += 1
            if self.gpu and time.monotonic() - last_gpu >= GPU_MEM_INTERVAL_S:
                last_gpu = time.monotonic()
                used = gpu_used_bytes({p.pid for p in procs})
                if used is not None:
                    self.peak_gpu = max(self.peak_gpu or 0, used)
            self._stop.wait(RSS_INTERVAL_S)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_bytes": self.peak_total or None, "peak_rss_bytes_max_process": self.peak_single or None,
                "rss_samples": self.samples, "rss_interval_s": RSS_INTERVAL_S, "peak_gpu_used_bytes": self.peak_gpu}


def gpu_used_bytes(pids: set[int]) -> Optional[int]:
    """Device memory nvidia-smi attributes to ``pids`` (None when it cannot say)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    used = None  # none of ours listed (in a container nvidia-smi may show the host's pids): unknown, not 0
    for line in out.stdout.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and int(pid) in pids and mib.strip().isdigit():
            used = (used or 0) + int(mib) * 2**20
    return used


def run_training(overrides: list[str], run_dir: Path, world: int, args: argparse.Namespace) -> Measured:
    """One ``llmsys.train`` process tree to the end, its memory sampled; raises with the log's tail on failure."""
    run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd, launcher = launch_command(world, [f"trainer.output_dir={run_dir}", *overrides], args, port)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    log_path = run_dir / "bench.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        memory = TreeMemory(proc.pid, gpu=torch.cuda.is_available())
        try:
            rc = proc.wait(timeout=args.point_timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if proc.poll() is None:  # timed out, or this script was interrupted: its own session gets no Ctrl-C
                os.killpg(proc.pid, signal.SIGKILL)  # the process group this call started, and nothing else
                proc.wait()
            mem = memory.stop()
            for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
                leftover.unlink(missing_ok=True)  # DeepSpeed's CPU all-reduce buffers of this run's port
    wall = time.perf_counter() - started
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        what = f"timed out after {args.point_timeout} s" if rc is None else f"exited {rc}"
        error = RunOOM if rc is not None and any(mark in tail for mark in OOM_MARKS) else RuntimeError
        raise error(f"{' '.join(cmd)} {what}:\n{tail}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # ZeRO states: the disk a sweep needs, not its data
    return Measured(run_dir, metrics, load_run_config(run_dir), wall, {**mem, "launcher": launcher})


def gpu_allocated_peak(metrics: list[dict]) -> Optional[int]:
    """Rank 0's ``torch.cuda.max_memory_allocated`` over the run (the trainers log it on GPUs), else None."""
    peaks = [row["gpu_max_allocated_bytes"] for row in metrics if "gpu_max_allocated_bytes" in row]
    return max(peaks) if peaks else None


def load_run_config(run_dir: Path) -> Config:
    """The resolved config the run wrote (``config.yaml``), as the typed tree."""
    from omegaconf import OmegaConf

    register()
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config),
                                               OmegaConf.load(run_dir / "config.yaml")))


# -- what a point runs ----------------------------------------------------------------------------


class Exports:
    """The exports stages start from, per architecture: the first measured pretrain/sft/reward run's
    ``final/`` when there is one, else a 1-step untimed run made on demand (ZeRO-0, one process)."""

    def __init__(self, work: Path, args: argparse.Namespace):
        self.work, self.args = work, args
        self.paths: dict[tuple[str, str], Path] = {}

    def offer(self, point: Point, run_dir: Path) -> bool:
        """Keep ``run_dir/final`` as this architecture's ``point.stage`` export if none is kept yet."""
        key = (point.model, point.stage)
        if point.stage in ("pretrain", "sft", "reward") and key not in self.paths:
            self.paths[key] = run_dir / "final"
            return True
        return False

    def get(self, model: str, stage: str) -> Path:
        key = (model, stage)
        if key not in self.paths:
            fixture = Point(stage, model)
            run_dir = self.work / "fixtures" / model / stage
            overrides = point_overrides(fixture, self, self.args, steps=1)
            run_training(overrides, run_dir, 1, self.args)
            self.paths[key] = run_dir / "final"
        return self.paths[key]


def point_overrides(point: Point, exports: Exports, args: argparse.Namespace, steps: Optional[int] = None) -> list[str]:
    """The Hydra overrides of one run: the stage on its embedded data, the point's settings, per-device
    batch fixed (the global batch grows with the world size), the inputs it starts from, and --override."""
    online = point.stage in ONLINE
    mb = args.micro_batch
    out = [f"stage={point.stage}", f"model={point.model}", *args.base_overrides, f"data={STAGE_DATA[point.stage]}",
           f"data.seq_len={args.seq_len}", f"trainer.max_steps={steps or (args.rl_steps if online else args.steps)}",
           "trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=0",
           f"trainer.precision={args.precision}", f"trainer.micro_batch_size={mb}",
           f"trainer.global_batch_size={mb * point.world * (1 if online else args.accumulation)}",
           f"deepspeed=zero{point.zero}", "logger.progress=false", *KERNELS[point.kernels]]
    rollout = args.rollout_per_device * point.world
    if point.stage == "ppo":
        out += [f"ppo.rollout_batch_size={rollout}", f"ppo.max_new_tokens={args.max_new_tokens}"]
    if point.stage == "grpo":
        out += [f"grpo.rollout_batch_size={rollout}", f"grpo.max_new_tokens={args.max_new_tokens}",
                f"grpo.group_size={args.group_size}"]
    for needed in NEEDS[point.stage]:
        key = "ppo.reward_model" if needed == "reward" else "model.init_from"
        out.append(f"{key}={exports.get(point.model, needed)}")
    return [*out, *args.override]


# -- reading a run back -----------------------------------------------------------------------------


def lm_step_tokens(stage: str, run_dir: Path, cfg: Config, world: int, steps: int) -> list[tuple[int, int]]:
    """Per optimizer step: (real tokens over all ranks, what the LM loop logs: rank 0's input_ids.numel()
    x world), by replaying the trainer's sampler over the run's data cache (final/config.json names it)."""
    tcfg = cfg.trainer
    if stage == "pretrain":
        tokens = tcfg.global_batch_size * cfg.data.seq_len  # dense blocks: no padding, equal on every rank
        return [(tokens, tokens)] * steps
    cache = json.loads((run_dir / "final" / "config.json").read_text())["data_cache"]
    if stage == "sft":
        packed = load_sft_data(cache).packed("train")
        lengths = packed.examples.lengths

        def micro_batch(indices: list[int]) -> tuple[int, int]:
            tokens = int(sum(int(lengths[e]) for row in indices for e in packed.rows[row]))
            return tokens, tokens
        size = len(packed)
    else:
        pairs = load_preference_data(cache).train

        def micro_batch(indices: list[int]) -> tuple[int, int]:
            rows = [tuple(len(part) for part in pairs.pair(i)) for i in indices]  # (prompt, chosen, rejected)
            width = max(p + max(c, r) for p, c, r in rows)  # collate_pairs pads every row to the longest
            return sum(2 * p + c + r for p, c, r in rows), 2 * len(rows) * width
        size = len(pairs)
    sampler = BlockSampler(size, tcfg.seed)
    out = []
    for step in range(steps):
        real = logged = 0
        for rank in range(world):
            for indices in sampler.micro_batches(step, tcfg.global_batch_size, tcfg.micro_batch_size, rank, world):
                tokens, padded = micro_batch(indices)
                real += tokens
                logged += padded * world if rank == 0 else 0
        out.append((real, logged))
    return out


def rollout_prompt_tokens(stage: str, run_dir: Path, cfg: Config, iterations: int) -> list[int]:
    """Per iteration: the prompt tokens of every rollout row over all ranks (GRPO: each prompt group_size
    times), from the prompt set the stage reads and its sampler."""
    scfg = cfg.ppo if stage == "ppo" else cfg.grpo
    tokenizer = load_tokenizer(run_dir / "tokenizer")  # the online stages save the model's tokenizer here
    prompts = load_prompts(cfg.data, tokenizer, max_len=cfg.data.seq_len - scfg.max_new_tokens)
    repeat = 1 if stage == "ppo" else cfg.grpo.group_size
    per_iter = scfg.rollout_batch_size // repeat
    sampler = BlockSampler(len(prompts.train), cfg.trainer.seed)
    return [repeat * sum(len(prompts.train[i]) for i in sampler.blocks(it * per_iter, (it + 1) * per_iter))
            for it in range(iterations)]


def model_flops(arch: ModelConfig, seq_len: int, scalar_head: bool) -> int:
    """Training FLOPs per token (PaLM); a scalar-head model (reward model, critic) has no vocabulary matmul."""
    fpt = flops_per_token(arch, seq_len)
    if scalar_head:
        fpt -= 6 * arch.vocab_size * arch.dim - 6 * arch.dim
    return fpt


def param_count(arch: ModelConfig, scalar_head: bool) -> int:
    """Parameters; a scalar-head model has a dim -> 1 head (weight and bias) instead of an LM head."""
    n = count_parameters(arch)["total"]
    return n - (0 if arch.tie_embeddings else arch.vocab_size * arch.dim) + arch.dim + 1 if scalar_head else n


def export_arch(path: Path) -> ModelConfig:
    return ModelConfig(**json.loads((path / "config.json").read_text())["model"])


def peak_for(precision: str, override: Optional[float]) -> tuple[Optional[float], str]:
    """The peak TFLOP/s per device MFU is taken against, and where it came from."""
    if override is not None:
        return override, "--peak-tflops"
    device = bench_device()
    if device.type != "cuda":
        return None, "none: a CPU has no table entry (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    # llmsys leaves TF32 off: an fp32 run's matmuls run on the CUDA cores (the table's "fp32" column).
    peak, source = peak_tflops_for(name, precision)
    return peak, (f"llmsys.trainers.observe.{source} for {name}" if peak else f"none: {source} (give --peak-tflops)")


def lm_row(point: Point, run: Measured, args: argparse.Namespace) -> dict:
    steps = [r for r in run.metrics if "tokens_per_sec" in r]
    tokens = lm_step_tokens(point.stage, run.run_dir, run.config, point.world, len(steps))
    previous, seconds, real, logged = 0, 0.0, 0, 0
    for row, (step_real, step_logged) in zip(steps, tokens):
        delta, previous = row["tokens"] - previous, row["tokens"]
        if delta != step_logged:
            raise RuntimeError(f"{point}: step {row['step']}: the trainer counted {delta} tokens, the replay of its "
                               f"data order {step_logged}; the real-token count cannot be trusted")
        if row["step"] > args.warmup and row["tokens_per_sec"] > 0:
            seconds += delta / row["tokens_per_sec"]
            real += step_real
            logged += step_logged
    if not seconds:
        raise RuntimeError(f"{point}: no steps after the {args.warmup} warm-up steps; raise --steps")
    final = run.run_dir / "final"
    fpt = model_flops(export_arch(final), args.seq_len, scalar_head=point.stage == "reward")
    tps = real / seconds
    return {"tokens_per_sec": tps, "tokens_per_sec_per_device": tps / point.world,
            "trainer_tokens_per_sec_per_device": logged / seconds / point.world,
            "real_over_trainer_tokens": real / logged, "flops_per_token": fpt,
            "tflops_per_device": tps * fpt / point.world / 1e12, "step_time_s": seconds / (len(steps) - args.warmup),
            "steps_timed": len(steps) - args.warmup, "params": param_count(export_arch(final), point.stage == "reward"),
            "final_loss": steps[-1].get("loss")}


def online_row(point: Point, run: Measured, args: argparse.Namespace, exports: Exports) -> dict:
    cfg = run.config
    scfg = cfg.ppo if point.stage == "ppo" else cfg.grpo
    iters = [r for r in run.metrics if "generation_time" in r]
    prompt_tokens = rollout_prompt_tokens(point.stage, run.run_dir, cfg, len(iters))
    rows = scfg.rollout_batch_size
    actor = export_arch(run.run_dir / "final")
    fwd_actor = model_flops(actor, args.seq_len, scalar_head=False) / 3  # PaLM's forward: a third of training
    if point.stage == "ppo":  # actor + reference + reward model + critic score; actor and critic train
        fwd_scalar = model_flops(export_arch(exports.get(point.model, "reward")), args.seq_len, scalar_head=True) / 3
        score_fpt, train_fpt = 2 * fwd_actor + 2 * fwd_scalar, cfg.ppo.ppo_epochs * 3 * (fwd_actor + fwd_scalar)
    else:  # actor (+ reference when the KL term is on) score; the actor trains
        score_fpt = fwd_actor * (2 if cfg.grpo.kl_coef else 1)
        train_fpt = cfg.grpo.epochs * 3 * fwd_actor
    previous = 0.0
    sums = dict.fromkeys(("time", "generation", "score", "train", "tokens", "generated", "flops", "train_flops"), 0.0)
    timed = 0
    for row, prompts in zip(iters, prompt_tokens):
        step_time, previous = row["elapsed"] - previous, row["elapsed"]
        if row["step"] <= args.rl_warmup:
            continue
        generated = round(row["response_length"] * rows)
        tokens = prompts + generated
        timed += 1
        sums["time"] += step_time
        sums["generation"] += row["generation_time"]
        sums["score"] += row["score_time"]
        sums["train"] += row["train_time"]
        sums["tokens"] += tokens
        sums["generated"] += generated
        sums["flops"] += tokens * (fwd_actor + score_fpt + train_fpt)
        sums["train_flops"] += tokens * train_fpt
    if not timed:
        raise RuntimeError(f"{point}: no iterations after the {args.rl_warmup} warm-up iterations; raise --rl-steps")
    tps = sums["tokens"] / sums["time"]
    return {"tokens_per_sec": tps, "tokens_per_sec_per_device": tps / point.world,
            "flops_per_token": (fwd_actor + score_fpt + train_fpt),
            "tflops_per_device": sums["flops"] / sums["time"] / point.world / 1e12,
            "train_tflops_per_device": sums["train_flops"] / sums["train"] / point.world / 1e12,
            "step_time_s": sums["time"] / timed, "generation_time_s": sums["generation"] / timed,
            "score_time_s": sums["score"] / timed, "train_time_s": sums["train"] / timed,
            "other_time_s": (sums["time"] - sums["generation"] - sums["score"] - sums["train"]) / timed,
            "generated_tokens_per_sec": sums["generated"] / sums["generation"],
            "generated_tokens_per_sec_per_device": sums["generated"] / sums["generation"] / point.world,
            "samples_per_sec": rows * timed / sums["time"],
            "samples_per_sec_per_device": rows * timed / sums["time"] / point.world,
            "rollout_batch": rows, "max_new_tokens": scfg.max_new_tokens,
            "response_length": sums["generated"] / rows / timed, "steps_timed": timed,
            "params": param_count(actor, False), "final_reward_mean": iters[-1].get("reward_mean")}


def measure(point: Point, sweep: str, exports: Exports, work: Path,
            args: argparse.Namespace) -> tuple[dict, Path, bool]:
    """One point's row; its run directory, and whether an export in it is kept for later stages."""
    name = f"{point.stage}-{point.model}-w{point.world}-z{point.zero}-{point.kernels}"
    run_dir = work / "runs" / name
    overrides = point_overrides(point, exports, args)
    run = run_training(overrides, run_dir, point.world, args)
    kept = exports.offer(point, run_dir)
    body = online_row(point, run, args, exports) if point.stage in ONLINE else lm_row(point, run, args)
    peak, source = peak_for(args.precision, args.peak_tflops)
    mfu = body["tflops_per_device"] / peak if peak else None
    row = {"impl": "llmsys", "sweep": sweep, "stage": point.stage, "model": point.model, "world_size": point.world,
           "nodes": args.nodes, "zero_stage": point.zero, "kernels": point.kernels, "precision": args.precision,
           "seq_len": args.seq_len, "micro_batch": args.micro_batch,
           "global_batch": run.config.trainer.global_batch_size, "threads_per_process": args.threads,
           "smoke": args.smoke, "tokens_counted": TOKENS_COUNTED[point.stage], **body,
           "peak_tflops": peak, "peak_source": source, "mfu": mfu,
           "mfu_train": body["train_tflops_per_device"] / peak if peak and "train_tflops_per_device" in body else None,
           **run.memory, "peak_gpu_allocated_bytes": gpu_allocated_peak(run.metrics), "wall_s": run.wall_s,
           "overrides": overrides, "status": "ok"}
    return row, run_dir, kept


# -- sweeps -----------------------------------------------------------------------------------------


def sweep_points(sweep: str, args: argparse.Namespace) -> list[tuple[Point, object]]:
    """(point, the swept value) pairs of one sweep, in order."""
    base_model = args.models[0]
    stages = args.stages if sweep == "stages" else args.axis_stages
    base = [Point(s, base_model, world=args.nproc) for s in stages]
    if sweep == "stages":
        return [(p, p.stage) for p in base]
    if sweep == "zero":
        return [(replace(p, zero=z), z) for z in args.zero for p in base]
    if sweep == "kernels":
        return [(replace(p, kernels=k), k) for k in args.kernels for p in base]
    if sweep == "size":
        return [(replace(p, model=m), m) for m in args.models for p in base]
    return [(replace(p, world=w), w) for w in args.world for p in base]


def add_peers(peers, results: Results, work: Path, args: argparse.Namespace) -> None:
    """``benchmarks/peers.py`` on the stages it has peers for (SFT, DPO): its rounds of a plain PyTorch loop,
    TRL (when installed) and llmsys back to back on one shape (the issue's; the micro one with --smoke),
    ratios taken within each round. Its rows go into our JSON as they are (``sweep`` "peers", stamped);
    the median ratios of its llmsys runs are copied onto our stages-sweep row of that stage as
    ``ratio_vs_<impl>`` (llmsys tokens/s over the peer's, > 1: llmsys is faster), with ``peers_shape``
    naming the shape they were measured on (which need not be this run's)."""
    stages = [s for s in args.stages if s in peers.STAGES]
    if not stages:
        return
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # its runs inherit this process's environment
    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    shape = peers.SMOKE_SHAPE if args.smoke else peers.ISSUE_SHAPE
    rows = peers.run_peers(stages, rounds=1 if args.smoke else 3, steps=args.steps, warmup=args.warmup, shape=shape,
                           work_dir=work)
    for row in rows:
        results.add({**row, "sweep": "peers", "smoke": args.smoke})
    results.add({"impl": "peers", "kind": "targets", "sweep": "peers", "targets": peers.targets(rows)})
    for ours in results.rows:
        if ours["impl"] != "llmsys" or ours["sweep"] != "stages" or "kind" in ours or ours["status"] != "ok":
            continue
        for median in rows:
            if median["kind"] == "median" and median["impl"] == "llmsys" and median["stage"] == ours["stage"]:
                ours.update({k: v for k, v in median.items() if k.startswith("ratio_vs_") and not k.endswith("_range")})
                ours["peers_shape"] = median["shape"]
    results.save()


def load_peers(wanted: bool):
    if not wanted:
        return None
    if importlib.util.find_spec("benchmarks.peers") is None:
        raise SystemExit("--peers: benchmarks/peers.py is not there (it runs TRL and the plain PyTorch loop)")
    return importlib.import_module("benchmarks.peers")


def plot(rows: list[dict], sweep: str, path: Path) -> None:
    """Left: real tokens/s per device against the swept value, per stage. Right: the stages sweep's PPO/GRPO
    time split, the world sweep's weak scaling efficiency, else peak memory (GPU: nvidia-smi; CPU: RSS)."""
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no plot")
        return
    ours = [r for r in rows if r["impl"] == "llmsys" and r["sweep"] == sweep and r.get("status") == "ok"]
    if not ours:
        return
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if sweep == "stages":
        ax.bar([r["stage"] for r in ours], [r["tokens_per_sec_per_device"] for r in ours])
        online = [r for r in ours if r["stage"] in ONLINE]
        bottom = [0.0] * len(online)
        for part in ("generation", "score", "train", "other"):
            values = [max(r[f"{part}_time_s"], 0.0) for r in online]
            ax2.bar([r["stage"] for r in online], values, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax2.set_ylabel("seconds per iteration")
        ax2.set_title("where PPO/GRPO time goes")
        if online:
            ax2.legend()
    else:
        key = {"zero": "zero_stage", "kernels": "kernels", "size": "model", "world": "world_size"}[sweep]
        if sweep == "world":
            second, scale, label = "weak_scaling_efficiency", 1.0, "weak scaling efficiency"
        elif torch.cuda.is_available():
            second, scale, label = "peak_gpu_used_bytes", 2**-30, "peak GPU memory, nvidia-smi (GiB)"
        else:
            second, scale, label = "peak_rss_bytes_max_process", 2**-30, "peak RSS of the largest process (GiB)"
        values = list(dict.fromkeys(r[key] for r in ours))
        for stage in dict.fromkeys(r["stage"] for r in ours):
            mine = {r[key]: r for r in ours if r["stage"] == stage}
            xs = [i for i, v in enumerate(values) if v in mine]
            ax.plot(xs, [mine[values[i]]["tokens_per_sec_per_device"] for i in xs], marker="o", label=stage)
            ys = [mine[values[i]].get(second) for i in xs]
            ax2.plot(xs, [y * scale if y is not None else math.nan for y in ys], marker="o", label=stage)
        ax2.set_ylabel(label)
        for a in (ax, ax2):
            a.set_xticks(range(len(values)), [str(v) for v in values])
            a.set_xlabel(key)
        ax.legend()
    ax.set_yscale("log")
    ax.set_ylabel("real tokens/s per device")
    first = ours[0]
    model = f"{first['model']}" if sweep == "size" else f"{first['model']}, {first['params'] / 1e6:.1f}M parameters"
    fig.suptitle(f"llmsys stages, {sweep} sweep ({first['device']}, {first['precision']}, {model})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluate_targets(rows: list[dict]) -> None:
    """Issue 14's MFU targets on an H100/H200 in bf16; printed, stored in the rows, never an exit status."""
    device = bench_device()
    if device.type != "cuda" or not any(chip in torch.cuda.get_device_name(device) for chip in ("H100", "H200")):
        print("TARGETS: not evaluated (they judge H100/H200 runs only)")
        return
    for row in rows:
        if (row["impl"] == "llmsys" and row["sweep"] == "stages" and row["stage"] in MFU_TARGETS
                and row["status"] == "ok"):
            row.setdefault("targets", []).append(verdict(f"{row['stage']} MFU ({row['model']}, {row['precision']})",
                                                         row["mfu"], MFU_TARGETS[row["stage"]], True))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", default="stages", help=f"comma-separated, of {', '.join(SWEEPS)}")
    p.add_argument("--stages", default=",".join(STAGES), help="the stages of the stages sweep")
    p.add_argument("--axis-stages", default=None, help="the stages the other sweeps run (default: --stages)")
    p.add_argument("--models", default="tiny", help="configs/model presets; the first is the base of every sweep "
                                                    "but size")
    p.add_argument("--zero", default="0,1,2,3", help="ZeRO stages of the zero sweep")
    p.add_argument("--kernels", default=None, help=f"of {', '.join(KERNELS)} (default: what runs natively here; "
                                                   "triton and fused_loss on a CPU run under Triton's interpreter)")
    p.add_argument("--world", default=None, help="world sizes of the world sweep (default: 1,2 on a CPU, "
                                                 "1,2,4.. up to the GPUs)")
    p.add_argument("--nproc", type=int, default=1, help="processes of every sweep but world")
    p.add_argument("--nodes", type=int, default=1, help="nodes (deepspeed launcher with --hostfile)")
    p.add_argument("--hostfile", type=Path, default=None)
    p.add_argument("--launcher", default="auto", choices=("auto", "torchrun", "deepspeed"),
                   help="for more than one process; auto: deepspeed on GPUs, torchrun on a CPU")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1),
                   help="OMP_NUM_THREADS of every process, the same at every world size (a CPU 'device')")
    p.add_argument("--precision", default="bf16" if gpu else "fp32", choices=("fp32", "bf16"))
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per device per micro-batch")
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step (LM stages)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps of the LM stages")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    p.add_argument("--rl-steps", type=int, default=6, help="PPO/GRPO iterations")
    p.add_argument("--rl-warmup", type=int, default=2)
    p.add_argument("--rollout-per-device", type=int, default=16, help="rollout rows per device per iteration")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--group-size", type=int, default=4, help="GRPO responses per prompt")
    p.add_argument("--override", action="append", default=[], help="a Hydra override for every run (repeatable)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak per device for MFU (CPUs, parts not in "
                                                                   "the table, fp32 on a GPU)")
    p.add_argument("--peers", action="store_true", help="also run benchmarks/peers.py (plain loop, TRL) on SFT/DPO")
    p.add_argument("--budget-s", type=float, default=0.0, help="start no new point after this many seconds (0: none)")
    p.add_argument("--point-timeout", type=int, default=1800, help="seconds one run may take")
    p.add_argument("--work-dir", type=Path, default=None, help="run directories (default: a temporary one; on "
                                                               "several nodes a shared file system)")
    p.add_argument("--keep-runs", action="store_true", help="keep the run directories")
    p.add_argument("--smoke", action="store_true", help="CI: every stage on a micro model, then the world sweep "
                                                        "of pretraining at 1 and 2 processes (CPU, 1.5-3 min)")
    p.add_argument("--out", type=Path, default=None, help="default: $OUT, else benchmarks/results/")
    args = p.parse_args(argv)

    args.base_overrides = []
    if args.smoke:
        args.sweep, args.stages, args.axis_stages = "stages,world", ",".join(STAGES), "pretrain"
        args.world, args.models = "1,2", "tiny"
        args.steps, args.warmup, args.rl_steps, args.rl_warmup = 6, 2, 4, 1
        args.seq_len, args.micro_batch, args.rollout_per_device, args.max_new_tokens = 64, 4, 8, 8
        args.nproc, args.nodes, args.point_timeout = 1, 1, 300
        args.base_overrides = SMOKE_MODEL
    args.sweeps = [s for s in args.sweep.split(",") if s]
    args.stages = [s for s in args.stages.split(",") if s]
    args.axis_stages = [s for s in (args.axis_stages.split(",") if args.axis_stages else args.stages) if s]
    args.models = [m for m in args.models.split(",") if m]
    args.zero = [int(z) for z in args.zero.split(",") if z]
    if args.world is None:
        top = torch.cuda.device_count() * args.nodes if gpu else 2
        args.world = ",".join(str(2**i) for i in range(int(math.log2(max(top, 1))) + 1))
    args.world = [int(w) for w in args.world.split(",") if w]
    native = ["sdpa", "fused_ops"]
    if gpu:
        native[1:1] = ["triton", "fused_loss"] + (["flash_attn"] if importlib.util.find_spec("flash_attn") else [])
    args.kernels = [k for k in args.kernels.split(",") if k] if args.kernels else native

    for name, values, allowed in (("--sweep", args.sweeps, SWEEPS), ("--stages", args.stages, STAGES),
                                  ("--axis-stages", args.axis_stages, STAGES), ("--kernels", args.kernels, KERNELS),
                                  ("--zero", args.zero, (0, 1, 2, 3))):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            p.error(f"{name}: {bad or 'nothing given'}; choose from {', '.join(map(str, allowed))}")
    for m in args.models:
        if not (config_dir() / "model" / f"{m}.yaml").is_file():
            p.error(f"--models: unknown model {m!r}; see configs/model/")
    if "flash_attn" in args.kernels and not (gpu and importlib.util.find_spec("flash_attn")):
        p.error("--kernels flash_attn needs a CUDA device and the flash-attn package")
    if any(w < 1 or w % args.nodes for w in [*args.world, args.nproc]):
        p.error(f"world sizes must be positive multiples of --nodes={args.nodes}")
    if gpu and max(*args.world, args.nproc) > torch.cuda.device_count() * args.nodes:
        p.error(f"a world size exceeds the {torch.cuda.device_count()} GPUs x {args.nodes} nodes")
    if args.nodes > 1 and args.hostfile is None:
        p.error("--nodes > 1 needs --hostfile (the deepspeed launcher's)")
    if args.warmup >= args.steps:
        p.error("--warmup must leave timed steps (below --steps)")
    if set(ONLINE) & {*args.stages, *args.axis_stages}:
        if args.rollout_per_device % math.lcm(args.micro_batch, args.group_size):
            p.error(f"--rollout-per-device={args.rollout_per_device} must be a multiple of --micro-batch and "
                    f"--group-size")
        if args.max_new_tokens >= args.seq_len:
            p.error("--max-new-tokens must be below --seq-len (the prompt gets the rest)")
        if args.rl_warmup >= args.rl_steps:
            p.error("--rl-warmup must leave timed iterations (below --rl-steps)")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    peers = load_peers(args.peers)
    device = bench_device()
    results = Results("stages", stamp(device, ("deepspeed", "transformers", "trl")), args.out or default_out_dir(),
                      args.smoke)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="llmsys-stages-"))
    work.mkdir(parents=True, exist_ok=True)
    exports = Exports(work, args)
    done: dict[Point, dict] = {}  # the same run in two sweeps (stages' base = world 1) is measured once
    started = time.perf_counter()
    try:
        for sweep in args.sweeps:
            for point, value in sweep_points(sweep, args):
                if args.budget_s and time.perf_counter() - started > args.budget_s:
                    print(f"budget of {args.budget_s:.0f} s spent: {sweep} {point} not started")
                    continue
                if point in done:
                    row = results.add({**{k: v for k, v in done[point].items() if k not in results.stamp},
                                       "sweep": sweep, "reused_from": done[point]["sweep"]})
                else:
                    print(f"[{time.perf_counter() - started:6.0f} s] {sweep}={value}: {point}", flush=True)
                    try:
                        measured, run_dir, kept = measure(point, sweep, exports, work, args)
                    except RunOOM as oom:
                        print(f"out of memory: {sweep} {point}")
                        measured, kept = {"impl": "llmsys", "sweep": sweep, "stage": point.stage, "model": point.model,
                                          "world_size": point.world, "zero_stage": point.zero,
                                          "kernels": point.kernels, "smoke": args.smoke, "status": "oom",
                                          "error": str(oom)[-2000:]}, True
                    if not kept and not args.keep_runs:
                        shutil.rmtree(run_dir, ignore_errors=True)
                    row = results.add(measured)
                    done[point] = row
                if sweep == "world" and row["status"] == "ok":
                    one = done.get(replace(point, world=1))
                    ok = one is not None and one["status"] == "ok"
                    row["weak_scaling_efficiency"] = (row["tokens_per_sec_per_device"]
                                                      / one["tokens_per_sec_per_device"] if ok else None)
                    results.save()
        if peers is not None and not (args.budget_s and time.perf_counter() - started > args.budget_s):
            add_peers(peers, results, work, args)
    finally:
        if args.work_dir is None and not args.keep_runs:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep_runs:
            print(f"run directories kept in {work}")
    evaluate_targets(results.rows)
    results.save()
    shown = [{**r, "peak_rss_gib": r["peak_rss_bytes"] / 2**30 if r.get("peak_rss_bytes") else None}
             for r in results.rows if r["impl"] == "llmsys" and "kind" not in r]
    print_table(shown, [("sweep", "sweep", ""), ("stage", "stage", ""), ("model", "model", ""),
                        ("status", "status", ""), ("world", "world_size", ""), ("zero", "zero_stage", ""),
                        ("kernels", "kernels", ""), ("tok/s/dev", "tokens_per_sec_per_device", ",.0f"),
                        ("MFU", "mfu", ".3f"), ("RSS GiB", "peak_rss_gib", ".2f"),
                        ("gen tok/s/dev", "generated_tokens_per_sec_per_device", ",.0f"),
                        ("gen s", "generation_time_s", ".3f"), ("score s", "score_time_s", ".3f"),
                        ("train s", "train_time_s", ".3f"), ("weak eff", "weak_scaling_efficiency", ".2f")])
    for sweep in args.sweeps:
        plot(results.rows, sweep, results.base.with_name(f"{results.base.name}-{sweep}.png"))
    print(f"wrote {results.json_path}")


if __name__ == "__main__":
    main()
