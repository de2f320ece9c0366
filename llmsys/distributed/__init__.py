"""The only place in llmsys that talks to DeepSpeed and torch.distributed."""
from llmsys.distributed.engine import (
    LATEST,
    CheckpointError,
    Engine,
    FrozenModel,
    checkpoint_dirs,
    deepspeed_config,
    latest_checkpoint,
    lr_multiplier,
    param_groups,
    verify_checkpoint,
)
from llmsys.distributed.env import (
    DistInfo,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
    setup_environment,
    shutdown,
)

__all__ = [
    "LATEST", "CheckpointError", "DistInfo", "Engine", "FrozenModel", "all_reduce_max", "all_reduce_sum", "barrier",
    "broadcast_object", "checkpoint_dirs", "deepspeed_config", "init_distributed", "latest_checkpoint",
    "lr_multiplier", "param_groups", "setup_environment", "shutdown", "verify_checkpoint",
]
