"""The language-model training loop shared by every next-token stage (pre-training, SFT).

The loop, top to bottom: resume, then per optimizer step: this rank's micro-batches -> forward ->
backward -> DeepSpeed step (clip, AdamW, schedule at the accumulation boundary) -> log -> eval ->
checkpoint. Data order is a pure function of (seed, step), so the step is the whole data position.
A stage supplies only its data (:class:`LMData`): how many samples there are and how a list of
sample indices becomes a batch (dense blocks for pre-training, packed rows with ``cu_seqlens`` for SFT).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from llmsys.config import Config
from llmsys.data import BlockSampler
from llmsys.distributed import (
    DistInfo,
    Engine,
    all_reduce_sum,
    barrier,
    latest_checkpoint,
)
from llmsys.models import Transformer, count_parameters, flops_per_token, load_state, read_config, resolve_vocab_size
from llmsys.models.pretrained import save_pretrained
from llmsys.trainers.observe import MetricsLogger, Throughput, device_peak_tflops, write_run_config

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@dataclass
class LMData:
    """A stage's data as the loop sees it: samples addressed by index, and how to batch them."""

    train_size: int
    collate_train: Callable[[list[int]], Batch]  # sample indices -> input_ids, labels (, cu_seqlens)
    val_size: int
    collate_val: Callable[[list[int]], Batch]
    tokenizer_dir: Path  # copied into the export
    tokenizer_vocab: int
    cache_dir: Path  # recorded in the export's config.json
    max_tokens_per_sample: int  # for the FLOPs/MFU estimate (PaLM's attention term uses the length)


def _resume_path(cfg: Config, ckpt_root: Path) -> Optional[Path]:
    resume = cfg.trainer.resume
    if resume == "none":
        if latest_checkpoint(ckpt_root) is not None:
            raise FileExistsError(
                f"{ckpt_root} already holds checkpoints and trainer.resume=none would train over them; "
                f"use trainer.resume=auto to continue, or another trainer.output_dir")
        return None
    if resume == "auto":
        return latest_checkpoint(ckpt_root)
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"trainer.resume={resume}: no such checkpoint directory")
    return path


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def evaluate(engine: Engine, data: LMData, cfg: Config, dist: DistInfo) -> float:
    """Mean next-token loss over the first ``eval_samples`` validation samples, split evenly over ranks.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively).
    """
    n = min(cfg.trainer.eval_samples or data.val_size, data.val_size)
    per_rank = max(1, n // dist.world_size)
    indices = [(dist.rank * per_rank + i) % data.val_size for i in range(per_rank)]
    totals = torch.zeros(2, dtype=torch.float64, device=dist.device)
    mb = cfg.trainer.micro_batch_size
    with engine.evaluating():
        for i in range(0, per_rank, mb):
            loss = engine(**_to_device(data.collate_val(indices[i:i + mb]), dist.device))
            count = len(indices[i:i + mb])
            totals += torch.tensor([loss.item() * count, count], dtype=torch.float64, device=dist.device)
    loss_sum, count = all_reduce_sum(totals).tolist()
    return loss_sum / count


def train_lm(cfg: Config, dist: DistInfo, data: LMData) -> dict:
    """Train ``cfg.model`` on ``data`` with ``cfg.deepspeed``; checkpoints and export under trainer.output_dir."""
    tcfg = cfg.trainer
    out = Path(tcfg.output_dir)
    ckpt_root = out / "checkpoints"

    init_state = None
    model_cfg = cfg.model
    if cfg.model.init_from:
        saved = read_config(cfg.model.init_from)
        model_cfg = dataclasses.replace(saved, activation_checkpointing=cfg.model.activation_checkpointing,
                                        init_from=cfg.model.init_from)
        # Under ZeRO-3 rank 0 reads the file and every rank joins the gathered copy (an empty dict elsewhere).
        init_state = load_state(cfg.model.init_from, saved) if dist.is_main or cfg.deepspeed.stage != 3 else {}
    model_cfg = dataclasses.replace(model_cfg, vocab_size=resolve_vocab_size(model_cfg, data.tokenizer_vocab))
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")

    torch.manual_seed(tcfg.seed)
    engine = Engine(lambda: Transformer(model_cfg), ds=cfg.deepspeed, optim=cfg.optim, trainer=tcfg, dist=dist,
                    max_steps=tcfg.max_steps, init_state=init_state)
    del init_state

    resume_from = _resume_path(cfg, ckpt_root)
    start_step = 0
    if resume_from is not None:
        start_step = engine.load_checkpoint(resume_from)["step"]
        log.info("resumed from %s at step %d", resume_from, start_step)
    if dist.is_main:
        write_run_config(out, cfg, {"deepspeed_config.json": json.dumps(engine.config, indent=2) + "\n"})
    barrier()

    n_params = count_parameters(model_cfg)
    fpt = flops_per_token(model_cfg, data.max_tokens_per_sample)
    log.info("%s: model %s, %.2fM parameters (%.2fM non-embedding), %d train / %d val samples of <= %d tokens, "
             "world size %d, %d micro-batches of %d per rank per step", cfg.stage.name,
             model_cfg.name, n_params["total"] / 1e6, n_params["non_embedding"] / 1e6, data.train_size,
             data.val_size, data.max_tokens_per_sample, dist.world_size, engine.gradient_accumulation_steps,
             tcfg.micro_batch_size)
    logger = MetricsLogger(out, cfg.logger, enabled=dist.is_main, total_steps=tcfg.max_steps, start_step=start_step,
                           run_config={**dataclasses.asdict(cfg), "n_params": n_params["total"]})

    meter = Throughput(fpt, device_peak_tflops(dist.device, tcfg.peak_tflops), dist.world_size)
    sampler = BlockSampler(data.train_size, tcfg.seed)
    tokens_seen = 0  # all ranks; this rank's count times the world size (exact for fixed-length blocks)
    last_val: Optional[float] = None
    if tcfg.eval_every and start_step == 0:
        last_val = evaluate(engine, data, cfg, dist)
        logger.log({"step": 0, "val_loss": last_val})

    engine.train()
    window_loss = torch.zeros(2, dtype=torch.float64, device=dist.device)
    bar: dict = {}
    started = time.perf_counter()
    for step in range(start_step, tcfg.max_steps):
        meter.start()
        step_tokens = 0
        for indices in sampler.micro_batches(step, tcfg.global_batch_size, tcfg.micro_batch_size,
                                             dist.rank, dist.world_size):
            batch = _to_device(data.collate_train(indices), dist.device)
            loss = engine(**batch)
            engine.backward(loss)
            engine.step()
            window_loss[0] += loss.detach().double()
            window_loss[1] += 1
            step_tokens += batch["input_ids"].numel() * dist.world_size
        meter.stop(step_tokens)
        tokens_seen += step_tokens
        done = step + 1

        if done % tcfg.log_every == 0 or done == tcfg.max_steps:
            loss_sum, count = all_reduce_sum(window_loss).tolist()
            window_loss.zero_()
            row = {"step": done, "loss": loss_sum / count, "lr": engine.lr, "grad_norm": engine.grad_norm(),
                   **meter.report(), "tokens": tokens_seen}
            logger.log(row)
            bar = {"loss": row["loss"], "tok/s": row["tokens_per_sec"], "mfu": row["mfu"]}
        if tcfg.eval_every and (done % tcfg.eval_every == 0 or done == tcfg.max_steps):
            last_val = evaluate(engine, data, cfg, dist)
            logger.log({"step": done, "val_loss": last_val})
        logger.advance(done, {**bar, "val_loss": last_val})
        if (tcfg.save_every and done % tcfg.save_every == 0) or done == tcfg.max_steps:
            engine.save_checkpoint(ckpt_root, done, {"samples_seen": done * tcfg.global_batch_size},
                                   keep=tcfg.keep_checkpoints)

    # Final export: consolidated weights (gathered from ZeRO-3 shards if needed) + config + tokenizer.
    state = engine.consolidated_state_dict()
    if dist.is_main:
        save_pretrained(state, model_cfg, out / "final", tokenizer_dir=data.tokenizer_dir,
                        extra={"stage": cfg.stage.name, "step": tcfg.max_steps,
                               "precision": tcfg.precision, "data_cache": str(data.cache_dir)})
    barrier()
    logger.close()
    summary = {"output_dir": str(out), "steps": tcfg.max_steps, "val_loss": last_val,
               "seconds": time.perf_counter() - started, "params": n_params["total"]}
    if dist.is_main:
        log.info("done: %s", json.dumps(summary))
    return summary
