"""The supervised training loop shared by pre-training, SFT, the reward model and DPO.

The loop, top to bottom: resume, then per optimizer step: this rank's micro-batches -> forward ->
backward -> DeepSpeed step (clip, AdamW, schedule at the accumulation boundary) -> log -> eval ->
checkpoint. Data order is a pure function of (seed, step), so the step is the whole data position.
A step with a non-finite loss or gradient is skipped by the engine and counted by the
:class:`~llmsys.trainers.components.NumericalGuard`, which ends the run after ``trainer.max_bad_steps``
in a row; checkpoints wait for a good step and, like the export, are never written from non-finite weights.
A stage supplies only :class:`LMData`: how many samples there are, how a list of sample indices
becomes a batch (dense blocks for pre-training, packed rows with ``cu_seqlens`` for SFT, chosen and
rejected rows for the preference stages), and - for the stages that are not next-token prediction -
which model to build and how a batch becomes a loss and metrics. (PPO, which generates its own
data, has its own loop in :mod:`llmsys.trainers.ppo`.)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from llmsys.config import Config
from llmsys.data import IGNORE_INDEX, BlockSampler
from llmsys.distributed import DistInfo, Engine, barrier
from llmsys.models import Transformer, count_parameters, flops_per_token, resolve_vocab_size
from llmsys.models.lora import is_lora_param, lora_parameter_count
from llmsys.trainers.components import (
    STOP,
    MetricWindow,
    NumericalGuard,
    check_finite_weights,
    equal_share,
    export_final,
    initial_weights,
    resume,
    resume_config,
    resume_path,
    stopped_early,
)
from llmsys.trainers.observe import MetricsLogger, Throughput, device_peak_tflops, write_run_config

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
# engine, batch -> (loss to back-propagate, metrics of this micro-batch as 0-d tensors)
LossFn = Callable[[Engine, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def next_token_loss(engine: Engine, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pre-training and SFT: the model computes the mean next-token loss itself."""
    return engine(**batch), {}


def _no_fresh_params(name: str) -> bool:
    return False


@dataclass
class LMData:
    """A stage's data as the loop sees it: samples addressed by index, how to batch them, what to train."""

    train_size: int
    collate_train: Callable[[list[int]], Batch]  # sample indices -> input_ids, labels (, cu_seqlens)
    val_size: int
    collate_val: Callable[[list[int]], Batch]
    tokenizer_dir: Path  # copied into the export
    tokenizer_vocab: int
    cache_dir: Path  # recorded in the export's config.json
    max_tokens_per_sample: int  # for the FLOPs/MFU estimate (PaLM's attention term uses the length)
    model_class: type = Transformer  # or llmsys.models.heads.ScalarHeadModel (reward model)
    compute_loss: LossFn = next_token_loss
    fresh_param: Callable[[str], bool] = _no_fresh_params  # params the init_from export may lack
    export_extra: dict = field(default_factory=dict)  # recorded in the export's config.json
    # Runs once the engine holds the initial weights and before a checkpoint is restored (DPO computes
    # its reference log-probs here: at that moment the policy is the reference).
    before_training: Optional[Callable[[Engine], None]] = None


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def evaluate(engine: Engine, data: LMData, cfg: Config, dist: DistInfo) -> dict[str, float]:
    """Mean loss (and the stage's metrics) over the first ``eval_samples`` validation samples, each on
    exactly one rank, so the number does not depend on the world size. The next-token loss is a mean over
    target tokens (micro-batches weighted by their tokens: SFT's samples differ in length), the other
    stages' losses a mean over samples. Every rank runs the same number of forward passes (ZeRO-3 gathers
    parameters collectively): a rank whose share runs out repeats a sample with weight 0."""
    n = min(cfg.trainer.eval_samples or data.val_size, data.val_size)
    indices, n_real = equal_share(range(n), dist, every_item=True)
    window = MetricWindow(dist.device)
    mb = cfg.trainer.micro_batch_size
    with engine.evaluating():
        for i in range(0, len(indices), mb):
            real = indices[i:min(i + mb, n_real)]
            batch = _to_device(data.collate_val(real or indices[:1]), dist.device)
            loss, metrics = data.compute_loss(engine, batch)
            if not real:
                weight = 0
            elif data.compute_loss is next_token_loss:
                weight = int((batch["labels"] != IGNORE_INDEX).sum())
            else:
                weight = len(real)
            window.add(loss, metrics, weight=weight)
    return {f"val_{name}": value for name, value in window.mean().items()}


def train_lm(cfg: Config, dist: DistInfo, data: LMData) -> dict:
    """Train ``cfg.model`` on ``data`` with ``cfg.deepspeed``; checkpoints and export under trainer.output_dir."""
    tcfg = cfg.trainer
    out = Path(tcfg.output_dir)
    ckpt_root = out / "checkpoints"

    init_state = None
    model_cfg = cfg.model
    if cfg.model.init_from:
        model_cfg, init_state = initial_weights(cfg.model, cfg.model.init_from, dist, cfg.deepspeed.stage)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=resolve_vocab_size(model_cfg, data.tokenizer_vocab))
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")

    torch.manual_seed(tcfg.seed)
    engine = Engine(lambda: data.model_class(model_cfg), ds=cfg.deepspeed, optim=cfg.optim, trainer=tcfg,
                    dist=dist, max_steps=tcfg.max_steps, init_state=init_state,
                    fresh_param=lambda name: is_lora_param(name) or data.fresh_param(name))
    del init_state
    if data.before_training is not None:
        data.before_training(engine)

    resume_from = resume_path(tcfg.resume, ckpt_root)
    start_step = tokens_seen = 0  # tokens: all ranks; this rank's count times the world size
    if resume_from is not None:
        state = resume(engine, resume_from, cfg, data_key=data.cache_dir.name)
        start_step, tokens_seen = state["step"], state.get("tokens_seen", 0)
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
    if model_cfg.lora.rank:
        n_adapter = lora_parameter_count(model_cfg)
        log.info("LoRA rank %d on %s: %.3fM trainable of %.2fM parameters (%.2f%%)", model_cfg.lora.rank,
                 ",".join(model_cfg.lora.targets), n_adapter / 1e6, (n_params["total"] + n_adapter) / 1e6,
                 100 * n_adapter / (n_params["total"] + n_adapter))
    logger = MetricsLogger(out, cfg.logger, enabled=dist.is_main, total_steps=tcfg.max_steps, start_step=start_step,
                           run_config={**dataclasses.asdict(cfg), "n_params": n_params["total"]})

    meter = Throughput(fpt, device_peak_tflops(dist.device, tcfg.peak_tflops, tcfg.precision),
                       dist.world_size)
    sampler = BlockSampler(data.train_size, tcfg.seed)
    last_val: Optional[float] = None
    if tcfg.eval_every and start_step == 0:
        val = evaluate(engine, data, cfg, dist)
        last_val = val["val_loss"]
        logger.log({"step": 0, **val})

    engine.train()
    window = MetricWindow(dist.device)
    guard = NumericalGuard(tcfg.max_bad_steps, ckpt_root)
    bar: dict = {}
    started = time.perf_counter()
    with STOP.deferred():  # a stop signal ends the run after its step, with a checkpoint
        for step in range(start_step, tcfg.max_steps):
            meter.start()
            step_tokens = 0
            parts: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
            for indices in sampler.micro_batches(step, tcfg.global_batch_size, tcfg.micro_batch_size,
                                                 dist.rank, dist.world_size):
                batch = _to_device(data.collate_train(indices), dist.device)
                loss, metrics = data.compute_loss(engine, batch)
                engine.backward(loss)
                engine.step()
                parts.append((loss.detach(), {k: v.detach() for k, v in metrics.items()}))  # no graph kept
                step_tokens += batch["input_ids"].numel() * dist.world_size
            meter.stop(step_tokens)
            tokens_seen += step_tokens
            done = step + 1
            # A skipped step's numbers stay out of the averages; the guard reports them.
            guard.observe(done, skipped=engine.last_step_skipped, grad_norm=engine.grad_norm(),
                          loss=float(torch.stack([part[0] for part in parts]).mean()))
            if not engine.last_step_skipped:
                for loss, metrics in parts:
                    window.add(loss, metrics)

            if done % tcfg.log_every == 0 or done == tcfg.max_steps:
                row = {"step": done, **window.mean(), "lr": engine.lr, "grad_norm": engine.grad_norm(),
                       **guard.metrics(), **meter.report(), "tokens": tokens_seen}
                logger.log(row)
                bar = {"loss": row.get("loss"), "tok/s": row["tokens_per_sec"], "mfu": row["mfu"]}
            if tcfg.eval_every and (done % tcfg.eval_every == 0 or done == tcfg.max_steps):
                val = evaluate(engine, data, cfg, dist)
                last_val = val["val_loss"]
                logger.log({"step": done, **val})
            logger.advance(done, {**bar, "val_loss": last_val})
            stop = STOP.poll(dist)
            if guard.healthy and ((tcfg.save_every and done % tcfg.save_every == 0) or done == tcfg.max_steps or stop):
                check_finite_weights(engine, f"the checkpoint of step {done}", ckpt_root)
                engine.save_checkpoint(ckpt_root, done, {"samples_seen": done * tcfg.global_batch_size,
                                                         "tokens_seen": tokens_seen,
                                                         "config": resume_config(cfg, data.cache_dir.name)},
                                       keep=tcfg.keep_checkpoints)
            if stop:
                return stopped_early(stop, done, ckpt_root, logger, dist)

    export_final(engine, model_cfg, out / "final", data.tokenizer_dir, dist,
                 extra={**data.export_extra, "stage": cfg.stage.name, "step": tcfg.max_steps,
                        "precision": tcfg.precision, "data_cache": str(data.cache_dir)})
    logger.close()
    summary = {"output_dir": str(out), "steps": tcfg.max_steps, "val_loss": last_val,
               "seconds": time.perf_counter() - started, "params": n_params["total"]}
    if dist.is_main:
        log.info("done: %s", json.dumps(summary))
    return summary
