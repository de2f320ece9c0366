"""Batched autoregressive sampling with a KV cache (the rollout engine of the PPO stage).

Prompts of different lengths are right-padded and prefilled in one forward pass; each sequence's
cache length is then set to its own prompt length, so the first generated token of sequence b
overwrites the padding at position len_b and no pad is ever attended to. Every following step
feeds one token per sequence (``Transformer.decode``). Sequences that emit EOS stop: later tokens
are ``pad_id`` and ``lengths`` counts up to and including the EOS.

``use_cache=False`` recomputes the full forward pass over every sequence at every step; it exists to
check the cached path (greedy decoding must give the same tokens) and costs O(T^2).

A :class:`StaticDecoder` (``generate(..., decoder=...)``) is what makes decoding fast on a GPU, where a
single-token step of a small batch is a few hundred tiny kernel launches and the GPU waits on Python:
its KV cache, input token and lengths live at fixed addresses for the decoder's life, and its step has
fixed shapes and no host synchronisation, so the step can be compiled (``torch.compile``; on CUDA with
``mode="reduce-overhead"``, i.e. inductor kernels replayed as a CUDA graph) or captured once as a CUDA
graph of the eager kernels and replayed at the cost of one launch (``mode="cuda_graph"``: no compile
time, the same kernels as the eager path). HF transformers' ``StaticCache`` and gpt-fast rest on the
same idea. Prefill (one variable-length forward) stays eager; sampling stays outside the step, so the
same generator draws the same tokens on every path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from llmsys.models.transformer import KVCache, Transformer, _CacheStep


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
    # Padded on the host and copied once: a row-by-row fill on a GPU is one transfer per prompt.
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int32)
    ids = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
    return ids.to(device), lengths.to(device)


def _prefill(model: Transformer, ids: torch.Tensor, prompt_lens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits (B, V) at each prompt's last real token; ``ids`` (B, T) right-padded, written into the first
    T positions of the empty ``cache``.

    The prompts attend through a view of those T positions only (the writes land in the cache), not over
    the whole cache of T + max_new_tokens mostly-masked keys; and only the B last positions go through the
    LM head, not all B x T (at vocab 32k the full head is most of the prefill's FLOPs and memory)."""
    T = ids.shape[1]
    view = KVCache([k[:, :T] for k in cache.k], [v[:, :T] for v in cache.v], cache.lengths)
    hidden = model.cached_hidden_states(ids, view)
    rows = torch.arange(ids.shape[0], device=ids.device)
    return model.output(hidden[rows, prompt_lens.long() - 1])


def _decode_step(model: Transformer, token: torch.Tensor, lengths: torch.Tensor, k_cache: list[torch.Tensor],
                 v_cache: list[torch.Tensor], use_decode_kernel: bool) -> torch.Tensor:
    """Logits (B, V) of one new token per sequence, token (B, 1) placed at position ``lengths[b]``.

    ``Transformer.decode`` for T == 1 minus its host-side bounds check (``int(positions.max())``, a
    device-to-host sync that a CUDA graph cannot contain and ``torch.compile`` breaks its graph on) and
    minus the rebinding of ``cache.lengths``: the caller checked the bounds once and advances ``lengths``
    in place. Same modules, same operations, so the eager result is bit for bit ``decode``'s.
    """
    S = k_cache[0].shape[1]
    positions = lengths.long()[:, None]  # (B, 1)
    cos, sin = model._rope(S, token.device)
    mask = None
    if not use_decode_kernel:
        mask = (torch.arange(S, device=token.device)[None, None, :] <= positions[:, :, None])[:, None]
    lengths_after = (lengths + 1).to(torch.int32)
    h = model.tok_embeddings(token)
    for layer, k, v in zip(model.layers, k_cache, v_cache):
        h = layer(h, cos[positions], sin[positions], None, _CacheStep(k, v, positions, mask, lengths_after))
    return model.output(model.norm(h))[:, 0]


class StaticDecoder:
    """A KV cache of ``batch_size`` x ``max_len`` positions and a fixed-shape single-token step over it,
    reused by every :func:`generate` call given it (``generate(model, prompts, n, decoder=dec)``).

    ``mode``:

    - ``"eager"``: the step as plain PyTorch (the reference of the two below: ``Transformer.decode``'s
      operations, bit for bit);
    - ``"compile"``: ``torch.compile(fullgraph=True, dynamic=False)`` of the step; on CUDA with
      ``mode="reduce-overhead"`` (inductor's kernels, replayed as a CUDA graph), on the CPU inductor's
      C++ kernels. Compiled once here (tens of seconds), for this batch size and cache length; not with
      the decode-attention kernel (``use_decode_kernel``), whose checks run on the host;
    - ``"cuda_graph"``: the eager step captured once as a ``torch.cuda.CUDAGraph`` and replayed (CUDA only):
      the eager kernels with none of their launch cost, set up in a second.

    The cache and the step's inputs keep their addresses for the decoder's life, as a graph needs. Calls
    must bring exactly ``batch_size`` prompts with ``longest prompt + max_new_tokens <= max_len``. A
    cache longer than a call needs gives the same tokens up to float rounding (the masked positions are
    excluded, but the attention reductions run over a different length).
    """

    MODES = ("eager", "compile", "cuda_graph")

    def __init__(self, model: Transformer, batch_size: int, max_len: int, mode: str = "compile",
                 use_decode_kernel: Optional[bool] = None):
        if mode not in self.MODES:
            raise ValueError(f"StaticDecoder mode must be one of {self.MODES}, got {mode!r}")
        if batch_size < 1 or max_len < 2:
            raise ValueError(f"StaticDecoder needs batch_size >= 1 and max_len >= 2, got {batch_size}, {max_len}")
        weight = model.tok_embeddings.weight
        if mode == "cuda_graph" and weight.device.type != "cuda":
            raise ValueError(f"StaticDecoder mode 'cuda_graph' needs a model on a CUDA device, not {weight.device}")
        self.model, self.batch_size, self.max_len, self.mode = model, batch_size, max_len, mode
        self.use_decode_kernel = (model.cfg.decode_attention == "fused" if use_decode_kernel is None
                                  else use_decode_kernel)
        if mode == "compile" and self.use_decode_kernel:
            # decode_attention checks the cache lengths on the host, which torch.compile cannot trace.
            raise ValueError("StaticDecoder mode 'compile' cannot trace llmsys's decode-attention kernel "
                             "(model.decode_attention=fused); use mode 'cuda_graph' or 'eager', or "
                             "use_decode_kernel=False")
        self.device = weight.device
        self.cache = KVCache.allocate(model.cfg, batch_size, max_len, weight.dtype, self.device)
        self.lengths = self.cache.lengths  # (B,) int32, advanced in place by every step
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._logits: Optional[torch.Tensor] = None  # the graph's output buffer
        self._compiled: Optional[Callable[..., torch.Tensor]] = None
        was_training = model.training
        model.eval()
        model._rope(max_len, self.device)  # the rotary table exists before any trace or capture
        if mode == "compile":
            on_cuda = self.device.type == "cuda"
            if on_cuda:  # cudagraph trees accept in-place writes only into inputs at fixed addresses
                for t in (*self.cache.k, *self.cache.v, self.lengths, self.token):
                    torch._dynamo.mark_static_address(t)
            self._compiled = torch.compile(_decode_step, fullgraph=True, dynamic=False,
                                           mode="reduce-overhead" if on_cuda else None)
            for _ in range(3):  # compile, then (CUDA) warm up and record the graph
                self._run()
        elif mode == "cuda_graph":
            self._capture()
        model.train(was_training)
        # The warm-up and capture steps wrote position 0 of every row: prefill overwrites it.

    @torch.no_grad()
    def _run(self) -> torch.Tensor:
        args = (self.model, self.token, self.lengths, self.cache.k, self.cache.v, self.use_decode_kernel)
        if self._compiled is not None:
            if self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the last step's logits may be overwritten
            return self._compiled(*args)
        return _decode_step(*args)

    @torch.no_grad()
    def _capture(self) -> None:
        # Warm up on a side stream (lazy initialisation, cuBLAS workspaces), then capture one step.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = self._run()

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, prompt_lens: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Logits (B, V) at each prompt's last token; the cache then holds the prompts (right-padded ids)."""
        B, T = ids.shape
        if B != self.batch_size:
            raise ValueError(f"this StaticDecoder serves batches of {self.batch_size} prompts, got {B}")
        if T + max_new_tokens > self.max_len:
            raise ValueError(f"the longest prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"StaticDecoder's cache of {self.max_len} positions")
        self.lengths.zero_()
        logits = _prefill(self.model, ids, prompt_lens, self.cache)  # reads lengths (zeros), never writes them
        self.lengths.copy_(prompt_lens)  # drop the padding: generation continues right after each prompt
        return logits

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of token (B,) at each sequence's position, which it fills. The tensor returned is
        overwritten by the next step (the graph's output buffer): use it before stepping again."""
        self.token.copy_(token[:, None])
        if self._graph is not None:
            self._graph.replay()
            logits = self._logits
        else:
            logits = self._run()
        self.lengths += 1
        return logits


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 1.0, top_p: float = 1.0, eos_id: Optional[int] = None, pad_id: int = 0,
             generator: Optional[torch.Generator] = None, use_cache: bool = True,
             use_decode_kernel: Optional[bool] = None,
             all_finished: Optional[Callable[[torch.Tensor], bool]] = None,
             logprobs_temperature: Optional[float] = None,
             on_tokens: Optional[Callable[[torch.Tensor], None]] = None,
             decoder: Optional[StaticDecoder] = None) -> Generation:
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

    ``decoder`` (a :class:`StaticDecoder` of this model) runs prefill and steps in its preallocated
    cache, through its compiled or captured step; tokens, lengths and log-probs are as without it.
    """
    if all_finished is None:
        if eos_id is None:  # nothing can finish: skip the per-step device-to-host sync of the check
            def all_finished(done: torch.Tensor) -> bool:
                return False
        else:
            def all_finished(done: torch.Tensor) -> bool:
                return bool(done.all())
    if decoder is not None:
        if decoder.model is not model:
            raise ValueError("generate: the StaticDecoder was built for another model")
        if not use_cache:
            raise ValueError("generate: a StaticDecoder is a KV cache; use_cache=False cannot use it")
        if use_decode_kernel is not None and use_decode_kernel != decoder.use_decode_kernel:
            raise ValueError(f"generate: use_decode_kernel={use_decode_kernel} differs from the StaticDecoder's "
                             f"({decoder.use_decode_kernel}), which its step was built with")
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

    if decoder is not None:
        logits = decoder.prefill(ids, prompt_lens, max_new_tokens)
    elif use_cache:
        cache = KVCache.allocate(model.cfg, B, ids.shape[1] + max_new_tokens, model.tok_embeddings.weight.dtype,
                                 device)
        logits = _prefill(model, ids, prompt_lens, cache)
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
        if decoder is not None:
            logits = decoder.step(token)
        elif use_cache:
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
