"""llmsys's own export format: ``model.safetensors`` + ``config.json`` (+ tokenizer files).

This is what every stage writes to ``<output_dir>/final`` and what ``model.init_from`` reads, so the
next stage starts from the previous one by path. Weights are read with safetensors only (no pickle).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors.torch import load_file, save_file

from llmsys.config import ModelConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "llmsys"


def _unique_state(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; a tied output projection is the embedding.
    out = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if cfg.tie_embeddings:
        out.pop("output.weight", None)
    return out


def save_pretrained(state: Mapping[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path,
                    tokenizer_dir: Optional[str | Path] = None, extra: Optional[dict] = None) -> Path:
    """Write an export atomically: into ``<out_dir>.tmp`` first, then renamed over ``out_dir``."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_unique_state(state, cfg), str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "model": dataclasses.asdict(cfg), **(extra or {})}
    (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
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


def read_config(path: str | Path) -> ModelConfig:
    """The model config of an llmsys export, or of a Hugging Face model directory (``llmsys.models.hf``)."""
    from llmsys.models import hf

    if hf.is_hf_checkpoint(path) or hf.is_hub_name(path):
        return hf.read_hf_config(path)
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: not found; model.init_from must be an llmsys export directory "
                                f"holding {CONFIG_NAME} and {WEIGHTS_NAME}, or a Hugging Face model directory")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != FORMAT or "model" not in meta:
        raise ValueError(f"{cfg_file}: not an llmsys export (expected \"format\": \"{FORMAT}\" and a \"model\" field)")
    return ModelConfig(**meta["model"])


def load_state(path: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The saved weights, with the tied output projection restored as an alias of the embedding.

    A Hugging Face directory is read through ``llmsys.models.hf`` and renamed to llmsys's names."""
    from llmsys.models import hf

    if hf.is_hf_checkpoint(path) or hf.is_hub_name(path):
        return hf.load_hf_state(path, cfg)
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: not found")
    state = load_file(str(weights))
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state
