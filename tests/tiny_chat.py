"""A tiny random chat model for the tests of ``llmsys.chat``, ``llmsys.generate`` and the Hugging Face export.

Random weights never emit the end-of-turn token on their own, so :func:`stop_where_it_would_say` makes
the model end its turn wherever it would have said one chosen token: ``<|im_end|>``'s output row becomes
that token's row scaled by 1.05, so whenever that token wins the argmax with a positive logit, the end of
turn wins instead. Answers then stop at a point the test does not pick by hand, and other answers run to
the token limit.
"""
from __future__ import annotations

from pathlib import Path

import torch

from llmsys.config import ModelConfig
from llmsys.data import Tokenizer, chat_template_for, train_bpe_tokenizer
from llmsys.data.conversations import Messages
from llmsys.models import Transformer, save_pretrained
from llmsys.models.generation import Generation, generate

# ASCII only: the byte-level BPE then splits every non-ASCII character into several byte tokens.
TOKENIZER_TEXT = ["Hello, how are you today? I am fine, thank you.", "What is the capital of France? Paris.",
                  "Tell me a joke about a cat and a dog.", "The sun is a star; the moon is not."] * 5


def chat_tokenizer(directory: Path) -> Tokenizer:
    """A byte-level BPE with llmsys's special tokens (ChatML markers included), saved in ``directory``."""
    tokenizer = train_bpe_tokenizer(TOKENIZER_TEXT, 300)
    tokenizer.save(directory)
    return Tokenizer.from_dir(directory)


def tiny_model(vocab_size: int, max_seq_len: int = 96, seed: int = 0) -> Transformer:
    """A random 2-layer decoder (untied output), weights scaled up so that the argmax is never a near tie."""
    cfg = ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                      max_seq_len=max_seq_len, tie_embeddings=False)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    return model


@torch.no_grad()
def stop_where_it_would_say(model: Transformer, token_id: int, end_of_turn_id: int) -> None:
    """End the turn wherever the model would emit ``token_id`` (see the module docstring)."""
    model.output.weight[end_of_turn_id] = 1.05 * model.output.weight[token_id]


def greedy(model: Transformer, tokenizer: Tokenizer, messages: Messages, max_new_tokens: int) -> Generation:
    """llmsys's greedy answer to ``messages`` through the tokenizer's chat template: what the apps must give."""
    template = chat_template_for(tokenizer, "auto")
    return generate(model, [template.generation_prompt(messages)], max_new_tokens, temperature=0.0,
                    eos_id=template.end_of_turn_id, pad_id=tokenizer.pad_id)


def greedy_answer(model: Transformer, tokenizer: Tokenizer, messages: Messages,
                  max_new_tokens: int) -> tuple[str, int, bool]:
    """(text without the end-of-turn token, tokens generated, whether the turn ended) of :func:`greedy`."""
    out = greedy(model, tokenizer, messages, max_new_tokens)
    n, finished = int(out.lengths[0]), bool(out.finished[0])
    return tokenizer.decode(out.tokens[0, :n - int(finished)].tolist()), n, finished


def tiny_chat_export(root: Path, stop_prompt: Messages, stop_step: int = 2, max_seq_len: int = 96) -> Path:
    """``root/final``: a tiny model that ends its answer to ``stop_prompt`` at step ``stop_step`` (0-based;
    earlier if the token it would have said there comes sooner), saved like a stage's export."""
    tokenizer = chat_tokenizer(root / "tokenizer")
    model = tiny_model(tokenizer.vocab_size, max_seq_len)
    end_of_turn = chat_template_for(tokenizer, "auto").end_of_turn_id
    token = int(greedy(model, tokenizer, stop_prompt, stop_step + 1).tokens[0, stop_step])
    assert token != end_of_turn
    stop_where_it_would_say(model, token, end_of_turn)
    return save_pretrained(model.state_dict(), model.cfg, root / "final", tokenizer_dir=root / "tokenizer",
                           extra={"stage": "sft"})
