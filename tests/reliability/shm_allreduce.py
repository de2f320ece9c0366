"""``deepspeed --num_gpus N --no_local_rank --module tests.reliability.shm_allreduce OUT``: join the process group
the way ``llmsys.train`` does, then sum tensors with DeepSpeed's shared-memory all-reduce on the CPU (the path
``LOCAL_SIZE``, which the deepspeed launcher sets, switches on) after llmsys has unlinked the buffers' names.

Each rank writes ``OUT/rank<R>.json``: whether any rank's buffer name was still in /dev/shm, whether the
shared-memory op was the one used, and the largest error of each all-reduce against the exact sum.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from llmsys.config import DeepSpeedConfig
from llmsys.distributed import init_distributed, shutdown
from llmsys.distributed.env import _shm_buffer_path

# Below and above DeepSpeed's NAIVE_ALLREDUCE_THRESHOLD (1 MiB): its two shared-memory algorithms.
SIZES = (1_000, 700_001)


def main() -> None:
    out = Path(sys.argv[1])
    dist = init_distributed(DeepSpeedConfig())
    import deepspeed.comm as ds_comm

    torch.distributed.barrier()  # every rank past init_distributed, which unlinks its own name last
    names_left = [str(p) for r in range(dist.world_size) if (p := _shm_buffer_path(r)).exists()]
    backend = ds_comm.comm.cdb
    uses_shm = hasattr(torch.ops, "deepspeed") and hasattr(torch.ops.deepspeed, "inference_all_reduce_") \
        and getattr(backend, "shm_vector_kernel_level", 0) >= 1
    errors = []
    for round_ in range(3):  # the op double-buffers: several rounds pass every state of its handshake
        for size in SIZES:
            gen = torch.Generator().manual_seed(1000 * round_ + size)
            parts = torch.randn(dist.world_size, size, generator=gen)  # every rank draws all ranks' parts
            mine = parts[dist.rank].clone()
            ds_comm.inference_all_reduce(mine)
            errors.append(float((mine - parts.sum(0)).abs().max()))
    (out / f"rank{dist.rank}.json").write_text(json.dumps(
        {"names_left": names_left, "uses_shm": uses_shm, "max_errors": errors}))
    shutdown(dist)


if __name__ == "__main__":
    main()
