"""Pretrained weights in either format: an llmsys export or a Hugging Face model directory (or hub name).

``model.init_from`` and every reader of a stage's output come through here. :func:`read_config` and
:func:`load_state` look at what a directory holds and read it through :mod:`llmsys.models.export` or
:mod:`llmsys.models.hf`; :func:`init_config` is the model config of a run that starts from one.
Exports are written by :func:`save_pretrained` (llmsys's format; the Hugging Face one is ``hf.save_hf``).
A GGUF file is not read here: it is converted to an export first (``python -m llmsys.models.hf import``,
or once into a cache when given as ``model.init_from``), since its tokenizer must be rebuilt too.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from llmsys.config import ModelConfig
from llmsys.config.schema import Architecture
from llmsys.models.export import load_export_state, read_export_config
from llmsys.models.export import save_pretrained  # noqa: F401  (re-exported: writers import it from here)
from llmsys.models.gguf import find_gguf
from llmsys.models.hf import is_hf_checkpoint, is_hub_name, load_hf_state, read_hf_config


def _is_hf(path: str | Path) -> bool:
    return is_hf_checkpoint(path) or is_hub_name(path)


def read_config(path: str | Path) -> ModelConfig:
    """The architecture saved at ``path`` (llmsys export or Hugging Face directory), as a ModelConfig with
    the default implementation choices: what the weights need, none of a run's kernels or adapters."""
    if find_gguf(path) is not None:
        raise ValueError(f"{path}: not an export directory; a GGUF file (or a directory holding one) is converted "
                         f"first: `python -m llmsys.models.hf import {path} DST`, or once when given as "
                         "model.init_from")
    return read_hf_config(path) if _is_hf(path) else read_export_config(path)


def load_state(path: str | Path, cfg: Architecture) -> dict[str, torch.Tensor]:
    """The weights saved at ``path`` under llmsys's names (a Hugging Face directory's renamed and checked
    against ``cfg``), the tied output projection an alias of the embedding."""
    return load_hf_state(path, cfg) if _is_hf(path) else load_export_state(path, cfg)


def init_config(path: str | Path, run: ModelConfig) -> ModelConfig:
    """The model config of a run whose weights start from ``path`` (``model.init_from``).

    The architecture is the one saved at ``path`` (``run``'s own architecture fields are overridden); the
    implementation (kernels, activation checkpointing, LoRA) is ``run``'s; ``init_from`` is ``path``.
    """
    return dataclasses.replace(run.with_architecture(read_config(path)), init_from=str(path))
