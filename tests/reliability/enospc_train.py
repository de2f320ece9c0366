"""``python -m tests.reliability.enospc_train RANK STEP [overrides]``: ``llmsys.train`` in which the disk of one
rank fills while it writes checkpoint STEP.

On rank RANK, ``torch.save`` into ``step_<STEP>.tmp`` (DeepSpeed's shards, llmsys's RNG file) writes the first
half of the file and then fails the way the kernel does: ``OSError(ENOSPC)``. The other ranks write as usual,
so the run shows whether one rank's full disk fails every rank together (a real full disk is shared by them).
"""
from __future__ import annotations

import errno
import io
import os
import sys

import torch


def _failing_save(rank: int, step: int):
    real_save = torch.save
    here = int(os.environ.get("RANK", "0"))

    def save(obj, f, *args, **kwargs):
        if here != rank or f"step_{step:08d}.tmp" not in str(f):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return save


def main() -> None:
    rank, step, *overrides = sys.argv[1:]
    torch.save = _failing_save(int(rank), int(step))  # DeepSpeed's checkpoint engine calls torch.save by name
    from llmsys import train

    sys.argv = [sys.argv[0], *overrides]
    train.main()


if __name__ == "__main__":
    main()
