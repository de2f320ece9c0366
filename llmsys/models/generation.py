"""Batched autoregressive sampling with a KV cache (the rollout engine of the PPO stage).

Prompts of different lengths are right-padded and prefilled in one forward pass; each sequence's
cache length is then set to its own prompt length, so the first generated token of sequence b
overwrites the padding at position len_b and no pad is ever attended to. Every following step
feeds one token per sequence (``Transformer.decode``). Sequences that emit EOS stop: later tokens
are ``pad_id`` and ``lengths`` counts up to and including the EOS.

``use_cache=False`` recomputes the full forward pass over every sequence at every step; it exists to
check the cached path (greedy decoding must give the same tokens) and costs O(T^2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from llmsys.models.transformer import KVCache, Transformer


@dataclass
class Generation:
    tokens: torch.Tensor  # (B, max_new_tokens) generated ids, pad_id after a sequence finished
    lengths: torch.Tensor  # (B,) generated tokens per sequence (EOS included)
    finished: torch.Tensor  # (B,) bool: the sequence ended with EOS (else it hit max_new_tokens)
    # (B, max_new_tokens) with ``logprobs_temperature``: log p(token) under log_softmax(logits / temperature)
    # of the very logits the token was drawn from (the decode path's numbers; 0 after a sequence finished)
    logprobs: Optional[torch.Tensor] = None


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of tokens whose probability
    mass reaches ``top_p`` (always at least the most likely one); the rest get -inf."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p == 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the mass before it already reaches top_p.
    drop = (probs.cumsum(dim=-1) - probs) >= top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """(B, V) logits -> (B,) ids. temperature 0 is greedy (argmax)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = top_p_filter(logits.float() / temperature, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=device)
    ids = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.as_tensor(prompt, dtype=torch.long, device=device)
    return ids, lengths


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 1.0, top_p: float = 1.0, eos_id: Optional[int] = None, pad_id: int = 0,
             generator: Optional[torch.Generator] = None, use_cache: bool = True,
             use_decode_kernel: Optional[bool] = None,
             all_finished: Optional[Callable[[torch.Tensor], bool]] = None,
             logprobs_temperature: Optional[float] = None,
             on_tokens: Optional[Callable[[torch.Tensor], None]] = None) -> Generation:
    """Sample up to ``max_new_tokens`` per prompt. ``use_decode_kernel`` runs single-token steps in
    llmsys's split-KV decode-attention kernel; None follows the model's ``decode_attention`` config.

    ``all_finished(finished)`` decides when to stop early (default: every sequence of this batch has
    ended). Under ZeRO-3 every forward pass gathers parameters collectively, so all ranks must run the
    same number of steps: pass a function that agrees across ranks (stop when every rank is done).

    ``logprobs_temperature`` also records each drawn token's log-probability at that temperature, from
    the logits it was sampled from: online RL compares them with the training forward's log-probs of the
    same tokens (a drift between the two paths is a silent off-policy error).

    ``on_tokens(tokens)`` is called after every step with the (B,) ids just drawn (``pad_id`` for a
    sequence that had already finished), the column ``Generation.tokens`` gets: a chat streams its answer
    from it while the rest is still being computed.
    """
    if all_finished is None:
        def all_finished(done: torch.Tensor) -> bool:
            return bool(done.all())
    if use_decode_kernel is None:
        use_decode_kernel = model.cfg.decode_attention == "fused"
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    was_training = model.training
    model.eval()
    device = model.tok_embeddings.weight.device
    # Padding fed to the model must be a real id (pad_id may be -1 or outside the vocabulary); it is
    # never attended to, so which id does not matter.
    filler = eos_id if eos_id is not None else 0
    ids, prompt_lens = _pad(prompts, filler, device)
    B = ids.shape[0]
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    fed = torch.full((B, max_new_tokens), filler, dtype=torch.long, device=device)  # what the model saw
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)
    token_logprobs = None
    if logprobs_temperature is not None:
        token_logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)

    if use_cache:
        cache = KVCache.allocate(model.cfg, B, ids.shape[1] + max_new_tokens, model.tok_embeddings.weight.dtype,
                                 device)
        logits = model.decode(ids, cache)[rows, prompt_lens.long() - 1]
        cache.lengths = prompt_lens.clone()  # drop the padding: generation continues right after each prompt
    else:
        logits = model(ids)[rows, prompt_lens.long() - 1]

    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, generator)
        token = torch.where(finished, torch.full_like(token, filler), token)
        out[:, step] = torch.where(finished, torch.full_like(token, pad_id), token)
        if on_tokens is not None:
            on_tokens(out[:, step])
        if token_logprobs is not None:
            logp = torch.log_softmax(logits.float() / logprobs_temperature, dim=-1).gather(1, token[:, None])[:, 0]
            token_logprobs[:, step] = torch.where(finished, torch.zeros_like(logp), logp)
        lengths += (~finished).long()
        if eos_id is not None:
            finished |= token == eos_id
        if step == max_new_tokens - 1 or all_finished(finished):
            break
        if use_cache:
            logits = model.decode(token[:, None], cache, use_decode_kernel=use_decode_kernel)[:, 0]
            fed[:, step] = token
        else:
            # Right padding is invisible to earlier positions under the causal mask, so reading the
            # logits at each sequence's last real token gives exactly the unpadded result.
            seq_lens = prompt_lens.long() + step + 1
            fed[:, step] = token
            packed = torch.full((B, ids.shape[1] + step + 1), filler, dtype=torch.long, device=device)
            for b in range(B):  # move the generated tokens next to each (shorter) prompt
                packed[b, : int(seq_lens[b])] = torch.cat([ids[b, : int(prompt_lens[b])], fed[b, : step + 1]])
            logits = model(packed)[rows, seq_lens - 1]
    model.train(was_training)
    return Generation(out, lengths, finished, token_logprobs)
