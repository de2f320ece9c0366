"""The one door to DeepSpeed: build the engine, step it, checkpoint it, export from it.

Trainers call :class:`Engine`; nothing else in llmsys imports ``deepspeed``. The engine owns ZeRO
(stage 0-3, CPU offload), mixed precision, gradient accumulation, clipping, AdamW and the
warm-up + decay schedule.

Checkpoints are DeepSpeed checkpoints written crash-safely::

    <root>/step_00000100.tmp/   written by every rank (DeepSpeed model/optimizer shards, RNG, trainer state)
    <root>/step_00000100/       the same directory after rank 0 renamed it, once every rank finished
    <root>/latest               the tag of the newest complete checkpoint, replaced atomically last

A crash at any point leaves ``latest`` naming a complete checkpoint. The root must be on a file
system that every node sees (as DeepSpeed itself assumes for ZeRO checkpoints).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from llmsys.config import DeepSpeedConfig, OptimConfig, TrainerConfig
from llmsys.distributed.env import DistInfo, barrier

log = logging.getLogger(__name__)

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
TAG_PREFIX = "step_"


def lr_multiplier(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning-rate factor before optimizer step ``step`` (0-based): linear warm-up, then decay to min_lr_ratio."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        decay = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the weight matrices of Linear and Embedding layers and LoRA adapters only (not norms, not
    biases), each tensor once even if tied. Decided by module type and name, not shape: ZeRO-3 has
    flattened the shapes. Frozen parameters are left out, and so is a group left empty by them (LoRA
    freezes every norm; DeepSpeed's ZeRO optimizers cannot flatten an empty group)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            is_matrix = isinstance(module, (nn.Linear, nn.Embedding)) and name in ("weight", "lora_A", "lora_B")
            (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def deepspeed_config(ds: DeepSpeedConfig, optim: OptimConfig, trainer: TrainerConfig, world_size: int) -> dict:
    """The DeepSpeed JSON config for these settings (also written to the run directory)."""
    per_step = trainer.micro_batch_size * world_size
    if trainer.global_batch_size % per_step:
        raise ValueError(
            f"trainer.global_batch_size={trainer.global_batch_size} is not divisible by "
            f"trainer.micro_batch_size * world_size = {trainer.micro_batch_size} * {world_size}; "
            f"choose a global batch that is a multiple of {per_step}")
    zero: dict = {"stage": ds.stage, "overlap_comm": ds.overlap_comm,
                  "contiguous_gradients": ds.contiguous_gradients, "reduce_bucket_size": ds.reduce_bucket_size}
    if ds.stage in (1, 2):
        zero["allgather_bucket_size"] = ds.allgather_bucket_size
    if ds.stage == 3:
        zero["stage3_prefetch_bucket_size"] = ds.stage3_prefetch_bucket_size
        zero["stage3_param_persistence_threshold"] = ds.stage3_param_persistence_threshold
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    pin = torch.cuda.is_available()
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    config: dict = {
        "train_batch_size": trainer.global_batch_size,
        "train_micro_batch_size_per_gpu": trainer.micro_batch_size,
        "gradient_accumulation_steps": trainer.global_batch_size // per_step,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": trainer.precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,  # llmsys logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if ds.offload_optimizer:
        # ZeRO-Offload steps the optimizer on the CPU with DeepSpeed's vectorised Adam.
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}}
    _deep_merge(config, ds.extra)
    return config


def _deep_merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_initial_weights(model: nn.Module, state: dict[str, torch.Tensor], *, zero3: bool,
                         fresh_param: Optional[Callable[[str], bool]] = None) -> None:
    """Copy full weights into a (possibly ZeRO-3 partitioned) model before an engine wraps it.

    Collective under ZeRO-3: every rank calls it; only rank 0 needs ``state`` (others pass ``{}``).
    The parameters that ``fresh_param`` names may be absent (LoRA adapters when starting from a base
    model, a reward model's new head): they keep their constructor init.
    """
    import deepspeed

    fresh = fresh_param or (lambda name: False)
    missing = [n for n, _ in model.named_parameters() if n not in state and not fresh(n)]
    if state and missing:
        raise KeyError(f"initial weights lack {len(missing)} parameters, e.g. {missing[:3]}")
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=zero3):
            if name in state:
                src = state[name]
                if src.shape != p.shape:
                    raise ValueError(f"initial weight {name} has shape {tuple(src.shape)}, "
                                     f"the model expects {tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(src.to(p.dtype))


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` (by the ``latest`` marker), or None."""
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{marker} names {path.name}, but {path / TRAINER_STATE} is missing; "
                                f"the checkpoint directory was removed or damaged")
    return path


class Engine:
    """A DeepSpeed engine over one model, with llmsys's checkpoint and export conventions."""

    def __init__(self, model_factory: Callable[[], nn.Module], *, ds: DeepSpeedConfig, optim: OptimConfig,
                 trainer: TrainerConfig, dist: DistInfo, max_steps: int,
                 init_state: Optional[dict[str, torch.Tensor]] = None,
                 fresh_param: Optional[Callable[[str], bool]] = None):
        """``init_state``: full initial weights (rank 0 only under ZeRO-3); ``fresh_param(name)`` names the
        parameters it may lack, which keep their constructor init (a reward model's new head)."""
        import deepspeed

        self.dist, self.ds_cfg = dist, ds
        self.config = deepspeed_config(ds, optim, trainer, dist.world_size)
        # Under ZeRO-3 each rank materialises only its shard of every parameter as it is built, so a
        # model larger than one device's memory can be constructed at all.
        with deepspeed.zero.Init(config_dict_or_path=self.config, enabled=ds.stage == 3):
            model = model_factory()
        if init_state is not None:
            load_initial_weights(model, init_state, zero3=ds.stage == 3, fresh_param=fresh_param)
        groups = param_groups(model, optim.weight_decay)
        optimizer = None
        if not ds.offload_optimizer:
            optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                          fused=dist.device.type == "cuda" or None)

        def scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, optim, max_steps))

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
            lr_scheduler=scheduler, config=self.config, dist_init_required=False)
        self.gradient_accumulation_steps = self.engine.gradient_accumulation_steps()

    # --- training -------------------------------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch; DeepSpeed scales by 1/accumulation and reduces gradients."""
        self.engine.backward(loss)

    def step(self) -> None:
        """Optimizer + schedule step at the accumulation boundary (clipping included)."""
        self.engine.step()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def grad_norm(self) -> Optional[float]:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        self.engine.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.engine.train()

    # --- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self, root: Path, step: int, trainer_state: dict, keep: int) -> Path:
        """Collective: every rank writes its shards; rank 0 publishes the checkpoint and prunes old ones."""
        tag = f"{TAG_PREFIX}{step:08d}"
        tmp_tag, final = f"{tag}.tmp", root / tag
        if self.dist.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(root / tmp_tag, ignore_errors=True)  # a crashed earlier attempt
        barrier()
        self.engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, root / tmp_tag / f"rng_rank{self.dist.rank}.pt")
        barrier()
        if self.dist.is_main:
            state = dict(trainer_state, step=step, world_size=self.dist.world_size, zero_stage=self.ds_cfg.stage)
            _write_text_atomic(root / tmp_tag / TRAINER_STATE, json.dumps(state, indent=2) + "\n")
            if final.exists():  # re-saving a step after a resume: replace it only once the new one is whole
                shutil.rmtree(final)
            os.replace(root / tmp_tag, final)
            _write_text_atomic(root / LATEST, tag + "\n")
            self._prune(root, keep, final)
        barrier()
        return final

    @staticmethod
    def _prune(root: Path, keep: int, newest: Path) -> None:
        done = sorted(p for p in root.glob(f"{TAG_PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep]:
            if old != newest:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> dict:
        """Restore model, optimizer, scheduler and RNG from a checkpoint dir; return its trainer state."""
        state_file = path / TRAINER_STATE
        if not state_file.is_file():
            raise FileNotFoundError(f"{state_file}: not found; trainer.resume must be 'auto', 'none' or a "
                                    f"checkpoint directory such as <output_dir>/checkpoints/step_00000100")
        state = json.loads(state_file.read_text())
        saved_world, saved_stage = state.get("world_size"), state.get("zero_stage")
        if saved_stage != self.ds_cfg.stage or (saved_stage and saved_world != self.dist.world_size):
            raise RuntimeError(
                f"{path}: written with ZeRO stage {saved_stage} on {saved_world} ranks; this run uses stage "
                f"{self.ds_cfg.stage} on {self.dist.world_size}. DeepSpeed cannot re-partition ZeRO optimizer "
                f"state: resume with the same layout, or export weights with DeepSpeed's zero_to_fp32.py and "
                f"start a new run with model.init_from")
        loaded, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise RuntimeError(f"{path}: DeepSpeed found no checkpoint to load")
        rng_file = path / f"rng_rank{self.dist.rank}.pt"
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        return state

    # --- export ---------------------------------------------------------------------------------

    def consolidated_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """Full weights on rank 0 (None elsewhere). Collective: under ZeRO-3 every rank must call it.

        Parameters are gathered one module at a time, so peak memory is one layer, not the model.
        """
        import deepspeed

        state: dict[str, torch.Tensor] = {}
        zero3 = self.ds_cfg.stage == 3
        for mod_name, module in self.module.named_modules():
            own = list(module.named_parameters(recurse=False))
            if not own:
                continue
            with deepspeed.zero.GatheredParameters([p for _, p in own], enabled=zero3):
                if self.dist.is_main:
                    for name, p in own:
                        state[f"{mod_name}.{name}" if mod_name else name] = p.detach().to("cpu", copy=True)
        return state if self.dist.is_main else None


class FrozenModel:
    """A model that is only evaluated (PPO's reference and reward models): never stepped, never saved.

    Under ZeRO 0-2 every rank holds a full copy in eval mode; with ``offload`` that copy stays in CPU
    memory and runs there (inputs are moved to the CPU, outputs back). Under ZeRO-3 the parameters are
    partitioned like the trained models' (DeepSpeed's engine without an optimizer, as DeepSpeed-Chat
    does for its reference model), and with ``offload`` they live in CPU memory between uses; every
    rank must then call it the same number of times.
    """

    def __init__(self, model_factory: Callable[[], nn.Module], *, ds: DeepSpeedConfig, trainer: TrainerConfig,
                 dist: DistInfo, init_state: dict[str, torch.Tensor],
                 fresh_param: Optional[Callable[[str], bool]] = None, offload: bool = False):
        import deepspeed

        self.dist, self.ds_cfg = dist, ds
        zero3 = ds.stage == 3
        bf16 = trainer.precision == "bf16"
        zero: dict = {"stage": 3 if zero3 else 0}
        if zero3:
            zero["stage3_param_persistence_threshold"] = ds.stage3_param_persistence_threshold
            if offload:
                zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        config = {"train_micro_batch_size_per_gpu": trainer.micro_batch_size,
                  "train_batch_size": trainer.micro_batch_size * dist.world_size,
                  "zero_optimization": zero, "bf16": {"enabled": bf16}, "steps_per_print": 2**31 - 1}
        with deepspeed.zero.Init(config_dict_or_path=config, enabled=zero3):
            model = model_factory()
        load_initial_weights(model, init_state, zero3=zero3, fresh_param=fresh_param)
        model.requires_grad_(False)
        self.run_on = dist.device
        if zero3:
            self.model = deepspeed.initialize(model=model, config=config, dist_init_required=False)[0]
        else:
            self.run_on = torch.device("cpu") if offload else dist.device
            self.model = model.to(self.run_on, dtype=torch.bfloat16 if bf16 else None)
        self.model.eval()

    @property
    def module(self) -> nn.Module:
        return self.model.module if hasattr(self.model, "module") else self.model

    def __call__(self, *args, **kwargs):
        if self.run_on == self.dist.device:
            with torch.no_grad():
                return self.model(*args, **kwargs)

        def move(x, device):
            if isinstance(x, torch.Tensor):
                return x.to(device)
            if isinstance(x, (tuple, list)):
                return type(x)(move(v, device) for v in x)
            return x

        with torch.no_grad():
            out = self.model(*move(args, self.run_on), **{k: move(v, self.run_on) for k, v in kwargs.items()})
        return move(out, self.dist.device)
