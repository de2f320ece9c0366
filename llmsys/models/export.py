"""llmsys's own export format: ``model.safetensors`` + ``config.json`` (+ tokenizer files).

This is what every stage writes to ``<output_dir>/final`` and what ``model.init_from`` reads, so the
next stage starts from the previous one by path. Weights are read with safetensors only (no pickle).

config.json holds ``"format": "llmsys"``, the model's architecture under ``"model"`` (the fields of
:class:`~llmsys.config.schema.Architecture`; how a run computed the model is not recorded, since it does
not change what the weights mean), and what the stage adds beside it (``stage``, ``step``, ``head``,
``merged_lora``, ...). Exports written before the architecture was split from the run's choices carry
every ModelConfig field under ``"model"``; the run-time ones are ignored when read.

Readers that also accept Hugging Face directories are in :mod:`llmsys.models.pretrained`.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmsys.config import ModelConfig
from llmsys.config.schema import Architecture
from llmsys.models.lora import is_lora_param
from llmsys.paths import DiskFullError, free_space, is_disk_full, megabytes

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "llmsys"

ARCHITECTURE_FIELDS = frozenset(f.name for f in dataclasses.fields(Architecture))
# What older exports also recorded under "model": kernels, recomputation, LoRA, init_from.
RUN_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig)) - ARCHITECTURE_FIELDS


def _unique_state(state: Mapping[str, torch.Tensor], cfg: Architecture) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; a tied output projection is the embedding.
    out = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if cfg.tie_embeddings:
        out.pop("output.weight", None)
    return out


def save_pretrained(state: Mapping[str, torch.Tensor], cfg: Architecture, out_dir: str | Path,
                    tokenizer_dir: Optional[str | Path] = None, extra: Optional[dict] = None) -> Path:
    """Write an export atomically: into ``<out_dir>.tmp`` first, then renamed over ``out_dir``.

    ``cfg`` (an Architecture or a whole ModelConfig) contributes its architecture only. LoRA adapters
    must be merged first (``llmsys.models.lora.merge_lora_state``): the export records no adapter config
    that could rebuild them. A write that fails removes ``<out_dir>.tmp`` and leaves ``out_dir`` as it was;
    a full disk is a :class:`~llmsys.paths.DiskFullError` naming the space free and needed."""
    adapters = [name for name in state if is_lora_param(name)]
    if adapters:
        raise ValueError(f"the state holds LoRA adapter tensors ({', '.join(adapters[:3])}, ...); merge them "
                         "into their base weights (llmsys.models.lora.merge_lora_state) before exporting")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    weights = _unique_state(state, cfg)
    tokenizer_files: list[Path] = []
    if tokenizer_dir is not None:
        # Only the tokenizer's files: an export passed as tokenizer_dir must not put its own weights and
        # config over the ones just written.
        tokenizer_files = [f for f in Path(tokenizer_dir).iterdir()
                           if f.is_file() and f.name not in (WEIGHTS_NAME, CONFIG_NAME) and not f.name.endswith(".tmp")]
    try:
        tmp.mkdir(parents=True)
        save_file(weights, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "model": cfg.architecture_dict(), **(extra or {})}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for f in tokenizer_files:
            shutil.copy2(f, tmp / f.name)
    except (OSError, RuntimeError, SafetensorError) as err:
        full = is_disk_full(err, tmp)  # before the cleanup frees the space it looks for
        shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            raise
        free, mount = free_space(out_dir)
        needed = sum(t.nbytes for t in weights.values()) + sum(f.stat().st_size for f in tokenizer_files)
        kept = f"the previous export {out_dir} is intact" if out_dir.exists() else f"{out_dir} was not written"
        raise DiskFullError(errno.ENOSPC, f"{out_dir}: no space left on device while writing the export "
                            f"({megabytes(free)} free on {mount}, the export needs about {megabytes(needed)}); "
                            f"removed the partial {tmp}; {kept}") from err
    return publish_dir(tmp, out_dir)


def publish_dir(tmp: Path, out_dir: Path) -> Path:
    """Rename a fully written ``tmp`` over ``out_dir``, so a reader never sees a half-written export."""
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def read_json(path: Path):
    """The JSON value in ``path``; a one-line error naming the file and the place when it is not JSON."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}); expected a JSON file") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file; a one-line error naming it when it is damaged or not one."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({' '.join(str(err).split())}); it may be "
                         f"truncated or damaged") from None


def read_export_config(path: str | Path) -> ModelConfig:
    """The architecture of an llmsys export, as a ModelConfig with the default implementation choices."""
    cfg_file = Path(path) / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: not found; model.init_from must be an llmsys export directory "
                                f"holding {CONFIG_NAME} and {WEIGHTS_NAME}, or a Hugging Face model directory")
    meta = read_json(cfg_file)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
        raise ValueError(f"{cfg_file}: not an llmsys export (expected \"format\": \"{FORMAT}\" and a \"model\" field)")
    saved = meta["model"]
    unknown = sorted(set(saved) - ARCHITECTURE_FIELDS - RUN_FIELDS)
    if unknown:
        raise ValueError(f"{cfg_file}: \"model\" has fields this llmsys does not know: {', '.join(unknown)}")
    return ModelConfig(**{key: value for key, value in saved.items() if key in ARCHITECTURE_FIELDS})


def load_export_state(path: str | Path, cfg: Architecture) -> dict[str, torch.Tensor]:
    """An export's weights, with the tied output projection restored as an alias of the embedding."""
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: not found")
    state = read_safetensors(weights)
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state
