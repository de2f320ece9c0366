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

A write that fails (a full disk, above all) fails the save on every rank together, never one rank raising
while the others wait in the next barrier: DeepSpeed's writes go through :class:`_GuardedWrites`, which
records a failure instead of raising it half way through DeepSpeed's collectives, and the ranks then
agree on the outcome. The partial ``.tmp`` is removed, ``latest`` and the checkpoints before are left as
they were, and every rank raises :class:`~llmsys.paths.DiskFullError` (the file, the space free on its
mount and the space the checkpoint needs) or, for another failed write, a ``RuntimeError`` naming the file.

Every checkpoint ends with ``manifest.json`` (each file's size and sha256), written by rank 0 after
all other files and before the rename, so a directory with a valid manifest is complete and unaltered.
Resuming checks it before any state is touched: a truncated, replaced or added file is named, and
``trainer.resume=auto`` falls back to the newest checkpoint that still verifies (saying so in the log).

Loading never executes code. A ``.pt`` file is a pickle, and unpickling may call any function it
names, so every file is first scanned for the globals it would import (only the few DeepSpeed types
of :func:`_checkpoint_globals` are allowed) and then read with ``torch.load(weights_only=True)``:
DeepSpeed's own reads (it uses ``weights_only=False``) go through :class:`_WeightsOnlyReads`.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from llmsys.config import DeepSpeedConfig, OptimConfig, TrainerConfig
from llmsys.distributed.env import DistInfo, all_reduce_max, barrier, broadcast_object
from llmsys.paths import DiskFullError, free_space, is_disk_full, megabytes

log = logging.getLogger(__name__)

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
TAG_PREFIX = "step_"
_TAG = re.compile(rf"{TAG_PREFIX}(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file and what is wrong with it."""


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
    # "decay" marks the group for Engine.apply_optim (an optimizer keeps unknown keys of its groups).
    groups = [{"params": decay, "weight_decay": weight_decay, "decay": True},
              {"params": no_decay, "weight_decay": 0.0, "decay": False}]
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
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.filename is None:  # a failed write(2) names no file
            err.filename = str(path)
        raise


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


# --- checkpoint files: manifest, trainer state, safe reads ------------------------------------------


def _checkpoint_globals() -> list[type]:
    """The only non-tensor types DeepSpeed 0.19 pickles into its checkpoints (the ZeRO optimizer states
    of stages 1-3 hold them; ZeRO-0 files, bf16 or not, hold none). Found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` over checkpoints of ZeRO 0-3 (fp32; ZeRO-0
    and 2 also bf16); a type a newer DeepSpeed adds is refused by name, to be reviewed and added here."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _qualname(obj: type) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def check_pickle(path: Path) -> None:
    """Refuse ``path`` (a :class:`CheckpointError` naming it) if its pickle would import anything besides
    tensors, plain data and :func:`_checkpoint_globals`. Reads the pickle's opcodes; runs none of them."""
    try:
        named = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint file ({_first_line(err)})") from None
    foreign = named - {_qualname(t) for t in _checkpoint_globals()}
    if foreign:
        raise CheckpointError(
            f"{path}: refused: its pickle would import {', '.join(sorted(foreign))}, which no llmsys "
            f"checkpoint holds (unpickling it could run code); resume only from checkpoints you trust")


def safe_load(path: Path, map_location: Any = None) -> Any:
    """``torch.load`` that cannot run code: :func:`check_pickle`, then ``weights_only=True`` with only
    :func:`_checkpoint_globals` allowed; any failure is a :class:`CheckpointError` naming the file."""
    check_pickle(path)
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint file ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class _WeightsOnlyReads:
    """DeepSpeed's checkpoint engine with its one read replaced by :func:`safe_load` (DeepSpeed itself
    calls ``torch.load(weights_only=False)``); writes and everything else are DeepSpeed's own."""

    def __init__(self, inner: Any):
        self._inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(Path(path), map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@dataclass(frozen=True)
class _WriteFailure:
    """A checkpoint write that failed on one rank; plain data, sent to every rank."""

    rank: int
    path: str
    error: str
    disk_full: bool


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensor storages in a nested state (each storage once): what ``torch.save`` writes of it,
    less the pickle around them."""
    seen: set[int] = set()
    total, stack = 0, [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


class _GuardedWrites:
    """DeepSpeed's checkpoint engine with its writes made to fail quietly for one save.

    An exception half way through DeepSpeed's ``save_checkpoint`` would take this rank out of the collectives
    that follow (it ends with a barrier) and leave every other rank waiting there. So the first write that
    fails on this rank is recorded in :attr:`failure` and this rank's later writes are skipped; every rank
    runs DeepSpeed's save to its end, and :meth:`Engine.save_checkpoint` then fails them all together.
    :attr:`requested_bytes` adds up the tensors every write was asked to hold: what the checkpoint needs."""

    def __init__(self, inner: Any):
        self._inner = inner
        self.begin(rank=0)

    def begin(self, rank: int) -> None:
        """Start a new save on ``rank``: no failure, nothing requested."""
        self.rank, self.requested_bytes = rank, 0
        self.failure: Optional[_WriteFailure] = None
        self.error: Optional[BaseException] = None

    def save(self, state_dict: Any, path: str) -> None:
        self.write(Path(path), lambda: self._inner.save(state_dict, path), _tensor_bytes(state_dict))

    def write(self, path: Path, write: Callable[[], Any], n_bytes: int = 0) -> None:
        """Run ``write`` (which writes ``path``) unless a write of this save failed already; record its failure."""
        self.requested_bytes += n_bytes
        if self.error is not None:
            return
        try:
            write()
        except (OSError, RuntimeError) as err:  # torch's writers raise RuntimeError for a failed write(2)
            self.failure = _WriteFailure(self.rank, str(path), _first_line(err), is_disk_full(err, path))
            # torch's zip writer holds its file open until it is freed, and the traceback's frames hold the
            # writer: cleared, the partial file no longer takes its space once it is removed.
            cause: Optional[BaseException] = err
            while cause is not None:
                traceback.clear_frames(cause.__traceback__)
                cause = cause.__cause__ or cause.__context__
            self.error = err

    def guarded(self, write: Callable[[str], Any]) -> Callable[[str], None]:
        """``write(path)``, a write DeepSpeed makes outside its checkpoint engine, through :meth:`write`."""
        return lambda path: self.write(Path(path), lambda: write(path))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a collective)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(ckpt: Path) -> None:
    """Record every file of ``ckpt`` (size and sha256) in its manifest; written last, atomically."""
    files = {str(f.relative_to(ckpt)): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(ckpt.rglob("*")) if f.is_file() and f.name != MANIFEST}
    _write_text_atomic(ckpt / MANIFEST, json.dumps({"files": files}, indent=1) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def verify_checkpoint(ckpt: Path) -> dict:
    """Check ``ckpt`` against its manifest and return its trainer state; :class:`CheckpointError` names
    the first missing, truncated, altered or unlisted file, or the ill-typed trainer-state field."""
    manifest_file = ckpt / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"{manifest_file}: missing; the checkpoint was not completely written "
                              f"(or predates llmsys's checkpoint manifests), so its files cannot be verified")
    manifest = _read_json(manifest_file)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()):
        raise CheckpointError(f"{manifest_file}: expected {{\"files\": {{name: {{\"bytes\": int, \"sha256\": str}}}}}}")
    for name, entry in files.items():
        file = ckpt / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{manifest_file}: lists {name!r}, which is outside the checkpoint directory")
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{file}: {size} bytes, {MANIFEST} records {entry['bytes']}: the file was "
                                  f"truncated or replaced after the checkpoint was written")
        if _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"{file}: its sha256 differs from the one in {MANIFEST}: the file was "
                                  f"altered or replaced after the checkpoint was written")
    for file in sorted(ckpt.rglob("*")):
        if file.is_file() and file.name != MANIFEST and str(file.relative_to(ckpt)) not in files:
            raise CheckpointError(f"{file}: not listed in {MANIFEST}; it was added after the checkpoint was written")
    if TRAINER_STATE not in files:
        raise CheckpointError(f"{ckpt / TRAINER_STATE}: missing (not listed in {MANIFEST})")
    return _trainer_state(ckpt / TRAINER_STATE)


def _trainer_state(path: Path) -> dict:
    state = _read_json(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(state).__name__}")
    for key, low, high in (("step", 0, None), ("world_size", 1, None), ("zero_stage", 0, 3)):
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
            expected = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
            raise CheckpointError(f"{path}: field {key!r} must be {expected}, found {value!r}")
    return state


def checkpoint_dirs(root: Path) -> list[Path]:
    """The published ``step_*`` directories under ``root``, oldest first (in-progress ``.tmp`` ones excluded)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _TAG.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint to resume from under ``root``: the one ``latest`` names if it verifies, else the
    newest one that does (logged), or None when ``root`` holds none. Raises :class:`CheckpointError`,
    listing why each was rejected, when checkpoints exist but none verifies: never a silent restart."""
    marker = root / LATEST
    candidates = list(reversed(checkpoint_dirs(root)))
    named: Optional[Path] = None
    rejected: list[str] = []
    if marker.is_file():
        tag = marker.read_text().strip()
        if _TAG.fullmatch(tag):
            named = root / tag
            candidates = [named] + [c for c in candidates if c != named]
        else:
            rejected.append(f"{marker}: names {tag!r}, not a checkpoint tag (step_<N>)")
            log.warning("%s; ignoring it", rejected[-1])
    elif candidates:
        log.warning("%s: missing; looking for the newest complete checkpoint among %d step_* directories",
                    marker, len(candidates))
    if not candidates and not rejected:
        return None
    for ckpt in candidates:
        try:
            if not ckpt.is_dir():
                raise CheckpointError(f"{ckpt}: missing (named by {marker})")
            verify_checkpoint(ckpt)
        except CheckpointError as err:
            rejected.append(str(err))
            log.warning("checkpoint rejected: %s", err)
            continue
        if ckpt != named:
            why = (f"{marker} names {named.name}" if named is not None
                   else f"{marker} {'names no checkpoint' if marker.is_file() else 'is missing'}")
            log.warning("resuming from %s, the newest checkpoint that verifies (%s)", ckpt, why)
        return ckpt
    raise CheckpointError(f"{root}: no checkpoint can be resumed from: " + "; ".join(rejected))


class Engine:
    """A DeepSpeed engine over one model, with llmsys's checkpoint and export conventions."""

    def __init__(self, model_factory: Callable[[], nn.Module], *, ds: DeepSpeedConfig, optim: OptimConfig,
                 trainer: TrainerConfig, dist: DistInfo, max_steps: int,
                 init_state: Optional[dict[str, torch.Tensor]] = None,
                 fresh_param: Optional[Callable[[str], bool]] = None):
        """``init_state``: full initial weights (rank 0 only under ZeRO-3); ``fresh_param(name)`` names the
        parameters it may lack, which keep their constructor init (a reward model's new head)."""
        import deepspeed

        self.dist, self.ds_cfg, self.optim = dist, ds, optim
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
            # torch's fused AdamW (one kernel over all tensors) on the CPU too: its default there is a
            # Python loop over the tensors, ~4x slower per step for a small model.
            optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                          fused=True)

        def scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, optim, max_steps))

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
            lr_scheduler=scheduler, config=self.config, dist_init_required=False)
        if dist.world_size == 1 and ds.stage == 0 and not (self.engine.bfloat16_enabled()
                                                            or self.engine.fp16_enabled()):
            # One rank: DeepSpeed's gradient "all-reduce" would flatten every gradient into buckets,
            # reduce over a group of one and copy it back, leaving the values as they were.
            self.engine.enable_backward_allreduce = False
        self._writes = _GuardedWrites(_WeightsOnlyReads(self.engine.checkpoint_engine))
        self.engine.checkpoint_engine = self._writes
        # The one file DeepSpeed writes around its checkpoint engine (zero_to_fp32.py, ZeRO 1-3, rank 0).
        self.engine._copy_recovery_script = self._writes.guarded(self.engine._copy_recovery_script)
        self.gradient_accumulation_steps = self.engine.gradient_accumulation_steps()
        self._nonfinite_loss = torch.zeros((), dtype=torch.bool, device=dist.device)
        self.last_step_skipped = False  # whether the latest optimizer step was skipped as non-finite
        self.skipped_steps = 0

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
        self._nonfinite_loss |= ~torch.isfinite(loss.detach()).all()
        self.engine.backward(loss)

    def step(self) -> None:
        """Optimizer + schedule step at the accumulation boundary (clipping included).

        A step is skipped (``last_step_skipped``) when a micro-batch loss of it on any rank was not finite,
        or, under ZeRO-0 where the full gradients are in ``p.grad``, a gradient was not: the flag is all-reduced
        so every rank agrees, and the wrapped torch optimizer's ``step`` is suppressed for this one
        DeepSpeed step, which works alike for ZeRO 0-3 (DeepSpeed still clears the gradients); weights,
        moments and the optimizer's step count stay untouched, and the schedule advances with the trainer
        step. Under ZeRO 1-3 a non-finite gradient behind a finite loss is only skipped where DeepSpeed's
        own overflow check does it (fp32 ZeRO 1-2); the trainers then see a non-finite ``grad_norm``.
        """
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
            return
        bad = self._nonfinite_loss.clone()
        if self.ds_cfg.stage == 0:
            # One foreach norm over all gradients: a finite norm means every element is finite, so the
            # exact per-tensor check runs only when the norm is not (an overflow of finite values included).
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            if grads and not bool(torch.nn.utils.get_total_norm(grads).isfinite()):
                for grad in grads:
                    bad |= ~torch.isfinite(grad).all()
        skip = bool(all_reduce_max(bad.to(torch.float32).reshape(1))[0] > 0)
        self._nonfinite_loss.zero_()
        before = self.engine.skipped_steps
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        if skip:
            inner.step = lambda *args, **kwargs: None  # shadows the class's step for this call only
        try:
            self.engine.step()
        finally:
            if skip:
                del inner.step
        if self.engine.skipped_steps > before:  # DeepSpeed skipped on its own and left the schedule behind
            self.scheduler.step()
            skip = True
        self.last_step_skipped = skip
        self.skipped_steps += skip

    def apply_optim(self) -> None:
        """After a resume: the optimizer settings of this run's config (``optim.lr``, ``weight_decay``,
        ``betas``, ``eps``) replace those restored from the checkpoint, from the current step on. (The
        schedule's shape - warm-up, decay, ``max_steps`` - is computed from this run's config anyway.)"""
        optim, sched = self.optim, self.scheduler
        sched.base_lrs = [optim.lr for _ in sched.base_lrs]
        factor = sched.lr_lambdas[0](sched.last_epoch)
        for group in sched.optimizer.param_groups:
            group.update(lr=optim.lr * factor, betas=tuple(optim.betas), eps=optim.eps)
            if group.get("decay", group["weight_decay"] > 0):
                group["weight_decay"] = optim.weight_decay
        sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]

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
        """Collective: every rank writes its shards; rank 0 publishes the checkpoint and prunes old ones.

        A failed write on any rank raises on every rank (the module docstring says how), leaving ``root`` as
        it was before the call."""
        tag = f"{TAG_PREFIX}{step:08d}"
        tmp, final = root / f"{tag}.tmp", root / tag
        if self.dist.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
        barrier()
        writes = self._writes
        writes.begin(self.dist.rank)
        self.engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        rng_file = tmp / f"rng_rank{self.dist.rank}.pt"
        writes.write(rng_file, lambda: torch.save(rng, rng_file), _tensor_bytes(rng))
        reports = _all_gather_object((writes.failure, writes.requested_bytes))  # also the barrier before publishing
        failures = [failure for failure, _ in reports if failure is not None]
        if failures:
            self._fail_save(root, step, failures[0], sum(n for _, n in reports), writes.error)
        failure: Optional[_WriteFailure] = None
        if self.dist.is_main:
            try:
                self._publish(root, tmp, final, dict(trainer_state, step=step, world_size=self.dist.world_size,
                                                     zero_stage=self.ds_cfg.stage), keep)
            except (OSError, RuntimeError) as err:
                writes.error = err
                failure = _WriteFailure(0, getattr(err, "filename", None) or str(tmp), _first_line(err),
                                        is_disk_full(err, tmp))
                if final.exists() and not tmp.exists():  # renamed, but `latest` could not be moved to it
                    shutil.rmtree(final, ignore_errors=True)
        failure = broadcast_object(failure)  # also the barrier after publishing
        if failure is not None:
            self._fail_save(root, step, failure, sum(n for _, n in reports), writes.error)
        return final

    def _publish(self, root: Path, tmp: Path, final: Path, state: dict, keep: int) -> None:
        """Rank 0: trainer state and manifest into ``tmp``, rename it to ``final``, point ``latest`` at it, prune."""
        _write_text_atomic(tmp / TRAINER_STATE, json.dumps(state, indent=2) + "\n")
        write_manifest(tmp)
        if final.exists():  # re-saving a step after a resume: replace it only once the new one is whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(root / LATEST, final.name + "\n")
        self._prune(root, keep, final)

    def _fail_save(self, root: Path, step: int, failure: _WriteFailure, needed: int,
                   error: Optional[BaseException]) -> None:
        """Collective: rank 0 removes the partial checkpoint; every rank raises the same one-line error (chained
        to its own failed write, ``error``, where it had one)."""
        tmp = root / f"{TAG_PREFIX}{step:08d}.tmp"
        message = None
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            good = root / LATEST
            named = root / good.read_text().strip() if good.is_file() else None
            kept = named if named is not None and named.is_dir() else next(reversed(checkpoint_dirs(root)), None)
            last = f"the last good checkpoint {kept} is intact" if kept else "no earlier checkpoint was written"
            if failure.disk_full:
                free, mount = free_space(root)
                message = (f"{failure.path}: no space left on device while writing checkpoint step {step} "
                           f"({megabytes(free)} free on {mount}, the checkpoint needs about {megabytes(needed)}); "
                           f"removed the partial {tmp}; {last}")
            else:
                message = (f"{failure.path}: writing checkpoint step {step} failed on rank {failure.rank} "
                           f"({failure.error}); removed the partial {tmp}; {last}")
        message = broadcast_object(message)
        if failure.disk_full:
            raise DiskFullError(errno.ENOSPC, message) from error
        raise RuntimeError(message) from error

    @staticmethod
    def _prune(root: Path, keep: int, newest: Path) -> None:
        done = sorted(p for p in root.glob(f"{TAG_PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep]:
            if old != newest:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: Path, check: Optional[Callable[[dict], None]] = None) -> dict:
        """Restore model, optimizer, scheduler and RNG from a checkpoint dir; return its trainer state.

        The directory is verified against its manifest and every ``.pt`` file is scanned before DeepSpeed
        reads anything, so a damaged or tampered checkpoint is refused with nothing loaded; so is one whose
        trainer state ``check`` raises on (settings the resume cannot honour)."""
        if not (path / TRAINER_STATE).is_file():
            raise CheckpointError(f"{path / TRAINER_STATE}: not found; trainer.resume must be 'auto', 'none' or "
                                  f"a checkpoint directory such as <output_dir>/checkpoints/step_00000100")
        state = verify_checkpoint(path)
        if check is not None:
            check(state)
        if self.engine.load_universal_checkpoint():
            raise CheckpointError(f"{path}: DeepSpeed reads universal checkpoints with torch.load(weights_only="
                                  f"False); llmsys does not load them (drop checkpoint.load_universal)")
        for pt in sorted(path.glob("*.pt")):
            check_pickle(pt)
        saved_world, saved_stage = state["world_size"], state["zero_stage"]
        if saved_stage != self.ds_cfg.stage or (saved_stage and saved_world != self.dist.world_size):
            raise CheckpointError(
                f"{path}: written with ZeRO stage {saved_stage} on {saved_world} ranks; this run uses stage "
                f"{self.ds_cfg.stage} on {self.dist.world_size}. DeepSpeed cannot re-partition ZeRO optimizer "
                f"state: resume with the same layout, or export weights with DeepSpeed's zero_to_fp32.py and "
                f"start a new run with model.init_from")
        loaded, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise CheckpointError(f"{path}: DeepSpeed found no checkpoint to load")
        # ZeRO-0 resumes at another world size (its states are whole on every rank). Every rank is seeded
        # alike (trainer.seed), so a rank the checkpoint has no RNG file for takes rank 0's.
        rng_rank = self.dist.rank if self.dist.rank < saved_world else 0
        if rng_rank != self.dist.rank:
            log.warning("%s: written on %d ranks; rank %d restores rank 0's RNG state", path, saved_world,
                        self.dist.rank)
        rng = safe_load(path / f"rng_rank{rng_rank}.pt")
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
