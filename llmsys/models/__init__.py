"""Models: plain nn.Module code, no parallelism, and the checkpoint formats they load from.

Inside, imports point one way: ``layers`` <- ``lora`` <- ``transformer`` (the ``Decoder`` trunk and the LM)
<- ``heads``, ``generation``; ``export`` (llmsys's format) <- ``gguf`` (llama.cpp's, read only) <- ``hf``
(Hugging Face's) <- ``pretrained``, which reads an export or a Hugging Face directory.
"""
from llmsys.models.hf import export_hf, import_hf, load_hf, save_hf
from llmsys.models.pretrained import init_config, load_state, read_config, save_pretrained
from llmsys.models.transformer import (
    IGNORE_INDEX,
    Transformer,
    count_parameters,
    flops_per_token,
    resolve_vocab_size,
)

__all__ = [
    "IGNORE_INDEX", "Transformer", "count_parameters", "flops_per_token", "resolve_vocab_size",
    "load_state", "read_config", "init_config", "save_pretrained", "load_hf", "save_hf", "export_hf", "import_hf",
]
