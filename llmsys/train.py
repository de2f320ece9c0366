"""``python -m llmsys.train [overrides]``: the one entry point for every training stage.

Works the same with no launcher (one process), under ``torchrun``, under the ``deepspeed`` launcher
(its ``--local_rank=N`` argument is accepted and removed before Hydra parses the overrides) and under
SLURM's ``srun``.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

import hydra
from omegaconf import DictConfig

from llmsys.config import ConfigError, config_dir, register, to_config, unknown_override_error

log = logging.getLogger("llmsys")


def _strip_local_rank(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local_rank N`` (deepspeed launcher), exporting it as LOCAL_RANK."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(arg)
    return out


def _configure_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank} %(name)s] %(message)s", datefmt="%H:%M:%S",
                        force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # DeepSpeed still calls collectives that torch 2.13 renamed; the warning repeats every step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def _trainer(stage: str):
    """The ``run(config, dist)`` of a stage's trainer module (imported on demand: each pulls its own deps)."""
    import importlib

    return importlib.import_module(f"llmsys.trainers.{stage}").run


def run_stage(cfg: DictConfig) -> dict:
    """Validate the composed config, join the process group and run the selected stage's trainer."""
    from llmsys.distributed import init_distributed, shutdown

    try:
        config = to_config(cfg)
    except ConfigError as err:
        log.error("invalid config: %s", err)
        sys.exit(2)
    dist = init_distributed(config.deepspeed)
    ok = False
    try:
        summary = _trainer(config.stage.name)(config, dist)
        ok = True
        return summary
    finally:
        shutdown(dist, clean=ok)


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _hydra_entry(cfg: DictConfig) -> None:
    _configure_logging()
    run_stage(cfg)


def main() -> None:
    register()
    argv = _strip_local_rank(sys.argv[1:])
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    error = unknown_override_error(overrides)
    if error:
        print(f"llmsys: {error}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *argv]
    _hydra_entry()


if __name__ == "__main__":
    main()
