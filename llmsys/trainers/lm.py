"""The supervised training loop shared by pre-training, SFT, the reward model and DPO.

The loop, top to bottom: resume, then per optimizer step: this rank's micro-batches -> forward ->
backward -> DeepSpeed step (clip, AdamW, schedule at the accumulation boundary) -> log -> eval ->
checkpoint. Data order is a pure function of (seed, step), so the step is the whole data position.
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

from llmsys.config import Config, LoRAConfig, ModelConfig
from llmsys.data import BlockSampler
from llmsys.distributed import (
    DistInfo,
    Engine,
    all_reduce_sum,
    barrier,
    latest_checkpoint,
)
from llmsys.models import Transformer, count_parameters, flops_per_token, load_state, read_config, resolve_vocab_size
from llmsys.models.lora import is_lora_param, lora_parameter_count, merge_lora_state
from llmsys.models.pretrained import save_pretrained
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


# Implementation switches (kernels, recomputation, adapters) come from the run's config; everything
# else (the architecture) from the checkpoint it starts from.
IMPLEMENTATION_FIELDS = ("attention", "loss", "norm", "rope", "mlp", "decode_attention",
                         "activation_checkpointing", "lora")


def initial_weights(run_model: ModelConfig, path: str, dist: DistInfo,
                    zero_stage: int) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The architecture and weights saved at ``path`` (llmsys export or Hugging Face directory), with this
    run's implementation switches. Under ZeRO-3 only rank 0 reads the file (the others get ``{}`` and
    join the gathered copy)."""
    saved = read_config(path)
    model_cfg = dataclasses.replace(saved, init_from=path,
                                    **{key: getattr(run_model, key) for key in IMPLEMENTATION_FIELDS})
    return model_cfg, load_state(path, saved) if dist.is_main or zero_stage != 3 else {}


def export_final(engine: Engine, model_cfg: ModelConfig, out_dir: Path, tokenizer_dir: Path, dist: DistInfo,
                 extra: dict) -> None:
    """Collective. Consolidated weights (gathered from ZeRO-3 shards if needed) + config + tokenizer,
    written by rank 0. LoRA adapters are merged into their base weights: the export is a plain model
    (config lora rank 0)."""
    state = engine.consolidated_state_dict()
    if dist.is_main:
        extra = dict(extra)
        export_cfg = model_cfg
        if model_cfg.lora.rank:
            state = merge_lora_state(state, model_cfg)
            export_cfg = dataclasses.replace(model_cfg, lora=LoRAConfig())
            extra["merged_lora"] = dataclasses.asdict(model_cfg.lora)
        save_pretrained(state, export_cfg, out_dir, tokenizer_dir=tokenizer_dir, extra=extra)
    barrier()


def resume_path(cfg: Config, ckpt_root: Path) -> Optional[Path]:
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


class MetricWindow:
    """Sums of the loss and each metric over micro-batches, averaged over all ranks on ``mean()``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.names: list[str] = []
        self.sums: Optional[torch.Tensor] = None

    def add(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], weight: int = 1) -> None:
        if self.sums is None:
            self.names = ["loss", *metrics]
            self.sums = torch.zeros(len(self.names) + 1, dtype=torch.float64, device=self.device)
        values = [loss.detach(), *(metrics[k].detach() for k in self.names[1:])]
        self.sums[:-1] += torch.stack([v.double().reshape(()) for v in values]) * weight
        self.sums[-1] += weight

    def mean(self) -> dict[str, float]:
        """Collective: every rank must call it (with the same metric names)."""
        totals = all_reduce_sum(self.sums).tolist()
        self.sums.zero_()
        return {name: value / totals[-1] for name, value in zip(self.names, totals)}


def evaluate(engine: Engine, data: LMData, cfg: Config, dist: DistInfo) -> dict[str, float]:
    """Mean loss (and the stage's metrics) over the first ``eval_samples`` validation samples, split
    evenly over ranks. Every rank runs the same number of forward passes (ZeRO-3 gathers parameters
    collectively)."""
    n = min(cfg.trainer.eval_samples or data.val_size, data.val_size)
    per_rank = max(1, n // dist.world_size)
    indices = [(dist.rank * per_rank + i) % data.val_size for i in range(per_rank)]
    window = MetricWindow(dist.device)
    mb = cfg.trainer.micro_batch_size
    with engine.evaluating():
        for i in range(0, per_rank, mb):
            loss, metrics = data.compute_loss(engine, _to_device(data.collate_val(indices[i:i + mb]), dist.device))
            window.add(loss, metrics, weight=len(indices[i:i + mb]))
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

    resume_from = resume_path(cfg, ckpt_root)
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
    if model_cfg.lora.rank:
        n_adapter = lora_parameter_count(model_cfg)
        log.info("LoRA rank %d on %s: %.3fM trainable of %.2fM parameters (%.2f%%)", model_cfg.lora.rank,
                 ",".join(model_cfg.lora.targets), n_adapter / 1e6, (n_params["total"] + n_adapter) / 1e6,
                 100 * n_adapter / (n_params["total"] + n_adapter))
    logger = MetricsLogger(out, cfg.logger, enabled=dist.is_main, total_steps=tcfg.max_steps, start_step=start_step,
                           run_config={**dataclasses.asdict(cfg), "n_params": n_params["total"]})

    meter = Throughput(fpt, device_peak_tflops(dist.device, tcfg.peak_tflops), dist.world_size)
    sampler = BlockSampler(data.train_size, tcfg.seed)
    tokens_seen = 0  # all ranks; this rank's count times the world size (exact for fixed-length blocks)
    last_val: Optional[float] = None
    if tcfg.eval_every and start_step == 0:
        val = evaluate(engine, data, cfg, dist)
        last_val = val["val_loss"]
        logger.log({"step": 0, **val})

    engine.train()
    window = MetricWindow(dist.device)
    bar: dict = {}
    started = time.perf_counter()
    for step in range(start_step, tcfg.max_steps):
        meter.start()
        step_tokens = 0
        for indices in sampler.micro_batches(step, tcfg.global_batch_size, tcfg.micro_batch_size,
                                             dist.rank, dist.world_size):
            batch = _to_device(data.collate_train(indices), dist.device)
            loss, metrics = data.compute_loss(engine, batch)
            engine.backward(loss)
            engine.step()
            window.add(loss, metrics)
            step_tokens += batch["input_ids"].numel() * dist.world_size
        meter.stop(step_tokens)
        tokens_seen += step_tokens
        done = step + 1

        if done % tcfg.log_every == 0 or done == tcfg.max_steps:
            row = {"step": done, **window.mean(), "lr": engine.lr, "grad_norm": engine.grad_norm(),
                   **meter.report(), "tokens": tokens_seen}
            logger.log(row)
            bar = {"loss": row["loss"], "tok/s": row["tokens_per_sec"], "mfu": row["mfu"]}
        if tcfg.eval_every and (done % tcfg.eval_every == 0 or done == tcfg.max_steps):
            val = evaluate(engine, data, cfg, dist)
            last_val = val["val_loss"]
            logger.log({"step": done, **val})
        logger.advance(done, {**bar, "val_loss": last_val})
        if (tcfg.save_every and done % tcfg.save_every == 0) or done == tcfg.max_steps:
            engine.save_checkpoint(ckpt_root, done, {"samples_seen": done * tcfg.global_batch_size},
                                   keep=tcfg.keep_checkpoints)

    export_final(engine, model_cfg, out / "final", data.tokenizer_dir, dist,
                 extra={**data.export_extra, "stage": cfg.stage.name, "step": tcfg.max_steps,
                        "precision": tcfg.precision, "data_cache": str(data.cache_dir)})
    logger.close()
    summary = {"output_dir": str(out), "steps": tcfg.max_steps, "val_loss": last_val,
               "seconds": time.perf_counter() - started, "params": n_params["total"]}
    if dist.is_main:
        log.info("done: %s", json.dumps(summary))
    return summary
