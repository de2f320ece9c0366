"""``python -m llmsys.train [overrides]``: the one entry point for every training stage.

Works the same with no launcher (one process), under ``torchrun``, under the ``deepspeed`` launcher
(its ``--local_rank=N`` argument is accepted and removed before Hydra parses the overrides) and under
SLURM's ``srun``.

One run per directory: rank 0 holds an exclusive ``flock`` on ``<trainer.output_dir>/.lock`` (its pid and
host written inside) for the whole run, so a second run started on the same directory exits at once with
status 2 naming the holder instead of interleaving metrics and replacing checkpoints. The kernel drops the
lock when the holder exits, however it exits, so a crashed run leaves nothing stale behind (the file itself
stays: removing it would let two runs lock two different files of the same name).

Exit statuses: 0 done, or stopped by SIGTERM/SIGUSR1/SIGINT after a step with a checkpoint to resume
from (see :class:`~llmsys.trainers.components.StopSignals`); 2 a user error (config, data, model, checkpoint,
disk: one line naming the file, key or path; ``--debug`` or ``HYDRA_FULL_ERROR=1`` shows the traceback)
or a busy output directory; 3 non-finite numbers; 4 a peer rank stopped answering (see
:mod:`llmsys.distributed.watchdog`); 128 + N stopped by signal N before training began (or by a second
Ctrl-C) without a checkpoint.

A run that meets non-finite numbers it cannot train past (``trainer.max_bad_steps`` skipped steps in a
row, or weights that are no longer finite when a checkpoint or export is due) exits with status 3 and a
one-line diagnostic, having written nothing from them.
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import IO, Optional

import hydra
from omegaconf import DictConfig

from llmsys.config import (
    Config,
    ConfigError,
    composition_error,
    config_dir,
    register,
    to_config,
    unknown_override_error,
)

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


LOCK_FILE = ".lock"
EXIT_USER_ERROR = 2  # bad config, data, model, checkpoint or disk: the message says what and where
EXIT_BUSY = 2  # the output directory is held by another run
EXIT_NON_FINITE = 3  # the run diverged; see NonFiniteError
# What a user can cause and fix (a path, a value, a file's contents, the disk): reported in one line. Internal
# errors keep their traceback.
USER_ERRORS = (ValueError, OSError)  # ConfigError, DataError are ValueErrors; CheckpointError below


def _debug() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("LLMSYS_DEBUG") == "1"


def say(line: str) -> None:
    """One line to stderr in one write(2): the ranks of a run share the stream, and a line written in
    pieces (print's text, then its newline) can be cut by another rank's."""
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), (line + "\n").encode())


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _try_lock(output_dir: Path) -> tuple[Optional[IO[str]], Optional[str]]:
    """The open, exclusively locked ``output_dir/.lock`` with this process's pid and host in it; or None and
    what the file says about the process holding it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    handle = (output_dir / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process (it has not written its pid yet)"
        handle.close()
        return None, holder
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle, None


def run_stage(cfg: DictConfig) -> dict:
    """Validate the composed config, join the process group, lock the output directory and run the
    selected stage's trainer; every failure a user can fix ends in one line and its exit status."""
    from llmsys.trainers.components import STOP, StopNow

    STOP.install()
    try:
        config = to_config(cfg)
    except ConfigError as err:
        log.error("invalid config: %s", err)
        sys.exit(EXIT_USER_ERROR)
    output_dir = Path(config.trainer.output_dir)
    try:
        return _run_reporting_errors(config, output_dir)
    except Exception:
        if STOP.stopped_by is None:
            raise
        # A stop signal unwound through library code that raised something else on the way out (datasets'
        # worker pool raises a TimeoutError while it is torn down): the signal is what happened.
        _stopped_at_once(config.stage.name, output_dir, StopNow(STOP.stopped_by))
    except StopNow as stop:
        _stopped_at_once(config.stage.name, output_dir, stop)


def _stopped_at_once(stage: str, output_dir: Path, stop: BaseException) -> None:
    ckpts = output_dir / "checkpoints"
    log.error("%s: stopped at once by %s, without writing a checkpoint; %s", stage, stop,
              f"those in {ckpts} are intact (a rerun resumes from the newest)" if ckpts.is_dir()
              else "none had been written")
    sys.exit(128 + stop.signum)


def _run_reporting_errors(config: Config, output_dir: Path) -> dict:
    """:func:`_locked_run`, its failures turned into their exit statuses."""
    from llmsys.distributed import CheckpointError
    from llmsys.trainers.components import STOP, NonFiniteError

    try:
        return _locked_run(config, output_dir)
    except NonFiniteError as err:
        log.error("%s: %s", config.stage.name, err)
        sys.exit(EXIT_NON_FINITE)
    except (*USER_ERRORS, CheckpointError) as err:
        if _debug() or STOP.stopped_by is not None:  # a stop signal is reported as such, by run_stage
            raise
        world = int(os.environ.get("WORLD_SIZE", "1"))
        prefix = f"rank {os.environ.get('RANK', '0')}: " if world > 1 else ""
        say(f"llmsys: {prefix}{_one_line(err)}  (--debug shows the traceback)")
        sys.exit(EXIT_USER_ERROR)


def _locked_run(config: Config, output_dir: Path) -> dict:
    from llmsys.distributed import broadcast_object, init_distributed, shutdown

    dist = init_distributed(config.deepspeed)
    lock = None
    ok = False
    try:
        lock, holder = _try_lock(output_dir) if dist.is_main else (None, None)
        holder = broadcast_object(holder)  # every rank leaves together
        if holder is not None:
            if dist.is_main:
                print(f"llmsys: trainer.output_dir={output_dir} is in use by {holder} ({output_dir / LOCK_FILE}); "
                      f"wait for that run to finish or choose another trainer.output_dir", file=sys.stderr)
            ok = True
            sys.exit(EXIT_BUSY)
        summary = _trainer(config.stage.name)(config, dist)
        ok = True
        return summary
    finally:
        shutdown(dist, clean=ok)
        if lock is not None:
            lock.close()  # releases the flock


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _hydra_entry(cfg: DictConfig) -> None:
    _configure_logging()
    run_stage(cfg)


def main() -> None:
    register()
    argv = _strip_local_rank(sys.argv[1:])
    if "--debug" in argv:  # full tracebacks for every error
        argv = [a for a in argv if a != "--debug"]
        os.environ["LLMSYS_DEBUG"] = os.environ["HYDRA_FULL_ERROR"] = "1"
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    error = unknown_override_error(overrides) or composition_error(overrides)
    if error:
        say(f"llmsys: {error}")
        sys.exit(2)
    sys.argv = [sys.argv[0], *argv]
    _hydra_entry()


if __name__ == "__main__":
    main()
