"""Models: plain nn.Module code, no parallelism."""
from llmsys.models.hf import export_hf, import_hf, load_hf, save_hf
from llmsys.models.pretrained import load_state, read_config, save_pretrained
from llmsys.models.transformer import (
    IGNORE_INDEX,
    Transformer,
    count_parameters,
    flops_per_token,
    resolve_vocab_size,
)

__all__ = [
    "IGNORE_INDEX", "Transformer", "count_parameters", "flops_per_token", "resolve_vocab_size",
    "load_state", "read_config", "save_pretrained", "load_hf", "save_hf", "export_hf", "import_hf",
]
