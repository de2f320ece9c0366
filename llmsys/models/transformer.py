"""A Llama-family decoder in plain PyTorch.

Pre-norm blocks of RMSNorm -> grouped-query attention with rotary position embeddings -> RMSNorm
-> SwiGLU MLP (Touvron et al. 2023, "Llama 2"; Shazeer 2020 for SwiGLU; Su et al. 2021 for RoPE;
Ainslie et al. 2023 for GQA). The module knows nothing of parallelism: DeepSpeed wraps it from
``llmsys.distributed``.

:class:`Decoder` is the trunk (embeddings, blocks, final norm: token ids -> hidden states) and holds no
output layer; :class:`Transformer`, the language model, is the trunk plus the vocabulary-sized
:class:`OutputHead`, and ``llmsys.models.heads.ScalarHeadModel`` is the trunk plus a one-number head.
Both subclass the trunk, so its parameters keep their names (``tok_embeddings.*``, ``layers.*``,
``norm.*``) in every model and one export loads into either.

Weights are initialised inside each module's own ``__init__`` (not by a later ``apply``): under
ZeRO-3, ``deepspeed.zero.Init`` partitions a module's parameters as soon as its constructor returns,
so initialisation that runs afterwards would touch empty shards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmsys.config import ModelConfig
from llmsys.config.schema import Architecture
from llmsys.models.layers import Embedding, Linear
from llmsys.models.lora import freeze_base, linear

IGNORE_INDEX = -100


class OutputHead(Linear):
    """The LM head. The loss is computed inside its forward so that, under ZeRO-3, DeepSpeed has
    gathered the (possibly tied) weight when the fused kernel reads it."""

    def __init__(self, dim: int, vocab_size: int, std: float, fused_loss: bool):
        super().__init__(dim, vocab_size, std)
        self.fused_loss = fused_loss

    def forward(self, hidden: torch.Tensor, labels: Optional[torch.Tensor] = None,
                logprobs_temperature: Optional[float] = None):
        if labels is None:
            return F.linear(hidden, self.weight)
        if logprobs_temperature is not None:
            return self.token_logprobs(hidden, labels, logprobs_temperature)
        if self.fused_loss:
            from llmsys.kernels import fused_linear_cross_entropy

            return fused_linear_cross_entropy(hidden, self.weight, labels, ignore_index=IGNORE_INDEX)
        logits = F.linear(hidden, self.weight)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)

    def token_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor,
                       temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token ``log p(label)`` and entropy of ``softmax(logits / temperature)``, fp32, shaped like
        ``labels``; both are 0 where the label is ignore_index."""
        valid = labels != IGNORE_INDEX
        if self.fused_loss:
            from llmsys.kernels import linear_logprobs

            logp, entropy = linear_logprobs(hidden, self.weight, labels.clamp(min=0), temperature=temperature)
            return logp * valid, entropy * valid
        # Eager: the head, the fp32 log-softmax and the entropy only at the labelled positions (a DPO or
        # RL micro-batch is mostly prompt and padding), scattered back into zeros.
        log_probs = torch.log_softmax(F.linear(hidden[valid], self.weight).float() / temperature, dim=-1)
        zeros = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        logp = zeros.masked_scatter(valid, log_probs.gather(-1, labels[valid].unsqueeze(-1)).squeeze(-1))
        entropy = zeros.masked_scatter(valid, -(log_probs.exp() * log_probs).sum(-1))
        return logp, entropy


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (Zhang & Sennrich 2019).

    ``forward(x, residual)`` first adds the residual stream and returns ``(normed, x + residual)``;
    with ``fused`` both run in one llmsys._C kernel (one read of each input, one write of each output).
    """

    def __init__(self, dim: int, eps: float, fused: bool = False):
        super().__init__()
        self.eps = eps
        self.fused = fused
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if self.fused:
            from llmsys.kernels import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            h = x + residual
            return self._norm(h), h
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotary_tables(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim // 2) in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, D) by position, GPT-NeoX/Llama half layout: pairs are (i, i + D/2).

    cos, sin: (T, D/2) shared by the batch, or (B, T, D/2) per sequence (KV-cache decoding, where each
    sequence is at its own position). Computed in fp32 and cast back.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos = cos[None, :, None, :] if cos.ndim == 2 else cos[:, :, None, :]
    sin = sin[None, :, None, :] if sin.ndim == 2 else sin[:, :, None, :]
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


@dataclass
class Packing:
    """Sequence boundaries of a packed row: ``cu_seqlens`` int32 (S + 1,), as flash-attn's varlen API.

    For SDPA, which has no varlen form, ``chunks`` cuts the row into runs of whole consecutive sequences
    (greedily, up to ``max(max_seqlen, PACKED_CHUNK_TOKENS)`` tokens each), and attention runs once per
    chunk with that chunk's own block-diagonal causal mask (``None`` when the chunk is one sequence: plain
    causal). One mask over the whole packed micro-batch would cost T^2 for T = rows x seq_len tokens; the
    chunks cost at most T x the chunk size, and no token can see past its sequence either way.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    positions: torch.Tensor  # (T,) position of each token within its own sequence (RoPE restarts at 0)
    chunks: Optional[list[tuple[int, int, Optional[torch.Tensor]]]]  # (start, stop, mask), SDPA path only

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, total: int, build_chunks: bool) -> "Packing":
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.ndim != 1 or len(cu_seqlens) < 2:
            raise ValueError("cu_seqlens must be a 1-D int32 tensor [0, end_1, ..., total]")
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total or bool((lengths < 0).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to the packed length {total}, got {cu_seqlens.tolist()}")
        seq_id = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)
        positions = torch.arange(total, device=cu_seqlens.device) - cu_seqlens.long()[seq_id]
        max_seqlen = int(lengths.max())
        chunks = None
        if build_chunks:
            chunks = []
            for start, stop, count in _chunk_bounds(lengths.tolist(), max(max_seqlen, PACKED_CHUNK_TOKENS)):
                mask = None
                if count > 1:
                    sid, pos = seq_id[start:stop], positions[start:stop]
                    mask = (sid[:, None] == sid[None, :]) & (pos[:, None] >= pos[None, :])
                chunks.append((start, stop, mask))
        return cls(cu_seqlens, max_seqlen, positions, chunks)


# Chunk size of packed SDPA attention: large enough that a chunk usually holds several short sequences
# (fewer kernel calls), small enough that the masked L^2 work stays near the per-sequence cost.
PACKED_CHUNK_TOKENS = 256


def _chunk_bounds(lengths: list[int], cap: int) -> list[tuple[int, int, int]]:
    """(start, stop, number of sequences) of runs of consecutive non-empty sequences, each run as long
    as fits in ``cap`` tokens (a sequence longer than ``cap`` is a run of its own)."""
    runs, start, size, count = [], 0, 0, 0
    for n in lengths:
        if n == 0:
            continue
        if size and size + n > cap:
            runs.append((start, start + size, count))
            start, size, count = start + size, 0, 0
        size += n
        count += 1
    if size:
        runs.append((start, start + size, count))
    return runs


@dataclass
class KVCache:
    """Per-layer key/value caches for incremental decoding, (B, S_max, Hkv, D) each, and how many
    positions of each sequence are filled. ``Transformer.decode`` writes new tokens at ``lengths``."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    lengths: torch.Tensor  # (B,) int32

    @classmethod
    def allocate(cls, cfg: Architecture, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device) -> "KVCache":
        if max_len > cfg.max_seq_len:
            raise ValueError(f"a KV cache of {max_len} positions exceeds model.max_seq_len={cfg.max_seq_len}")
        shape = (batch, max_len, cfg.kv_heads, cfg.head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)],
                   torch.zeros(batch, dtype=torch.int32, device=device))


@dataclass
class _CacheStep:
    """What every layer needs for one ``decode`` call: where the new tokens go and what they may see."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor  # (B, T) absolute position of each new token
    mask: Optional[torch.Tensor]  # (B, 1, T, S_max): key j visible to new token t iff j <= positions[b, t]
    lengths_after: torch.Tensor  # (B,) int32 filled positions once the new tokens are written


class Attention(nn.Module):
    """Grouped-query causal self-attention; the kernel is chosen by ``model.attention``.

    Packed batches (several sequences concatenated in one row, B == 1) pass ``cu_seqlens`` so that no
    token attends across a sequence boundary: the Triton and flash-attn kernels take it natively,
    SDPA runs once per chunk of whole sequences (``Packing.chunks``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.impl = cfg.attention
        self.fused_rope = cfg.rope == "fused"
        # Each projection is a Linear, or a LoRALinear where model.lora targets it.
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.wq = linear(cfg, "wq", cfg.dim, cfg.n_heads * cfg.head_dim, cfg.init_std, bias=cfg.qkv_bias)
        self.wk = linear(cfg, "wk", cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.init_std, bias=cfg.qkv_bias)
        self.wv = linear(cfg, "wv", cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.init_std, bias=cfg.qkv_bias)
        self.wo = linear(cfg, "wo", cfg.n_heads * cfg.head_dim, cfg.dim, out_std)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, packing: Optional[Packing] = None,
                cache: Optional[_CacheStep] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.fused_rope and cos.ndim == 2:  # per-sequence tables (decode steps) take the torch path
            from llmsys.kernels import apply_rotary as rotate
        else:
            rotate = apply_rotary
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            return self.wo(self._attend_cached(q, k, v, cache).reshape(B, T, -1))
        if self.impl == "sdpa":
            # SDPA wants (B, H, T, D); enable_gqa broadcasts the kv heads without copying them.
            # (Its output is (B, T, H, D) in memory, so transposing back costs no copy.)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            gqa = self.n_kv_heads != self.n_heads
            if packing is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).transpose(1, 2)
            else:
                outs = [F.scaled_dot_product_attention(
                    q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], attn_mask=mask, is_causal=mask is None,
                    enable_gqa=gqa).transpose(1, 2) for a, b, mask in packing.chunks]
                out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        elif self.impl == "triton":
            from llmsys.kernels import flash_attention

            if packing is None:
                out = flash_attention(q, k, v, causal=True)
            else:
                out = flash_attention(q[0], k[0], v[0], causal=True, cu_seqlens=packing.cu_seqlens,
                                      max_seqlen=packing.max_seqlen).unsqueeze(0)
        else:  # flash_attn (the schema checked that the package is installed)
            import flash_attn

            if packing is None:
                out = flash_attn.flash_attn_func(q, k, v, causal=True)
            else:
                out = flash_attn.flash_attn_varlen_func(
                    q[0], k[0], v[0], packing.cu_seqlens, packing.cu_seqlens, packing.max_seqlen,
                    packing.max_seqlen, causal=True).unsqueeze(0)
        return self.wo(out.reshape(B, T, -1))

    def _attend_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: _CacheStep) -> torch.Tensor:
        """Write the new keys/values into the cache, then attend over everything each sequence has."""
        batch = torch.arange(q.shape[0], device=q.device)[:, None]
        cache.k[batch, cache.positions] = k.to(cache.k.dtype)
        cache.v[batch, cache.positions] = v.to(cache.v.dtype)
        if cache.mask is None:  # one new token per sequence: the decode kernel reads the cache directly
            from llmsys.kernels import decode_attention

            return decode_attention(q[:, 0], cache.k, cache.v, cache.lengths_after).unsqueeze(1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), cache.k.transpose(1, 2).to(q.dtype), cache.v.transpose(1, 2).to(q.dtype),
            attn_mask=cache.mask, enable_gqa=self.n_kv_heads != self.n_heads)
        return out.transpose(1, 2)


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.hidden_dim
        self.w1 = linear(cfg, "w1", cfg.dim, hidden, cfg.init_std)
        self.w3 = linear(cfg, "w3", cfg.dim, hidden, cfg.init_std)
        self.w2 = linear(cfg, "w2", hidden, cfg.dim, cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self.fused = cfg.mlp == "fused"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from llmsys.kernels import swiglu

            return self.w2(swiglu(self.w1(x), self.w3(x)))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        fused = cfg.norm == "fused"
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, fused)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, fused)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, packing: Optional[Packing] = None,
                cache: Optional[_CacheStep] = None) -> torch.Tensor:
        attn = self.attention(self.attention_norm(x), cos, sin, packing, cache)
        normed, h = self.ffn_norm(attn, residual=x)  # h = x + attn, the residual stream
        return h + self.feed_forward(normed)


class Decoder(nn.Module):
    """The decoder trunk: token embeddings -> blocks -> final norm, (B, T) ids -> (B, T, dim) hidden states.

    No output layer: :class:`Transformer` adds the LM head, ``ScalarHeadModel`` a scalar one.
    ``cfg.vocab_size`` must be resolved (> 0) before construction.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (> 0) before building the model; "
                             "see llmsys.models.resolve_vocab_size")
        self.cfg = cfg
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.dim, cfg.init_std)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm == "fused")
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Not a buffer: ZeRO-3 would treat it as model state and bf16 casting would degrade it.
        key = (seq_len, str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rotary_tables(seq_len, self.cfg.head_dim, self.cfg.rope_theta, device)
        return self._rope_cache[key]

    def hidden_states(self, input_ids: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, dim) final-norm hidden states.

        With ``cu_seqlens`` the batch is one packed row (B == 1) of several sequences: positions restart
        at every sequence start and attention stays inside each sequence.
        """
        B, T = input_ids.shape
        packing = None
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"a packed batch with cu_seqlens must have batch size 1, got {B}")
            packing = Packing.from_cu_seqlens(cu_seqlens, T, build_chunks=self.cfg.attention == "sdpa")
            if packing.max_seqlen > self.cfg.max_seq_len:
                raise ValueError(f"a packed sequence of {packing.max_seqlen} tokens exceeds "
                                 f"model.max_seq_len={self.cfg.max_seq_len}")
            cos, sin = self._rope(self.cfg.max_seq_len, input_ids.device)
            cos, sin = cos[packing.positions], sin[packing.positions]
        else:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
            cos, sin = self._rope(T, input_ids.device)
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            if self.cfg.activation_checkpointing and self.training:
                h = checkpoint(layer, h, cos, sin, packing, use_reentrant=False)
            else:
                h = layer(h, cos, sin, packing)
        return self.norm(h)

    def cached_hidden_states(self, input_ids: torch.Tensor, cache: KVCache,
                             use_decode_kernel: bool = False) -> torch.Tensor:
        """:meth:`hidden_states` of new tokens (B, T) placed at each sequence's cache position.

        Token t of sequence b is placed at position ``cache.lengths[b] + t``; its keys/values are written
        into ``cache`` and ``cache.lengths`` advances by T. With ``use_decode_kernel`` and T == 1 the
        attention runs in llmsys's decode-attention kernel (split-KV over the cache) instead of SDPA.
        """
        B, T = input_ids.shape
        S = cache.k[0].shape[1]
        positions = cache.lengths.long()[:, None] + torch.arange(T, device=input_ids.device)
        if int(positions.max()) >= S:
            raise ValueError(f"the KV cache holds {S} positions; decoding would write position {int(positions.max())}")
        cos, sin = self._rope(S, input_ids.device)
        mask = None
        if not (use_decode_kernel and T == 1):
            mask = (torch.arange(S, device=input_ids.device)[None, None, :] <= positions[:, :, None])[:, None]
        lengths_after = (cache.lengths + T).to(torch.int32)
        h = self.tok_embeddings(input_ids)
        for layer, k_cache, v_cache in zip(self.layers, cache.k, cache.v):
            step = _CacheStep(k_cache, v_cache, positions, mask, lengths_after)
            h = layer(h, cos[positions], sin[positions], None, step)
        cache.lengths = lengths_after
        return self.norm(h)


class Transformer(Decoder):
    """Decoder-only language model: the :class:`Decoder` trunk and the LM head ``output``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        # Built after the trunk, so the random init draws in the order embeddings, blocks, head.
        self.output = OutputHead(cfg.dim, cfg.vocab_size, cfg.init_std, fused_loss=cfg.loss == "fused")
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if cfg.lora.rank > 0:  # only the adapters train
            freeze_base(self)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None, logprobs_temperature: Optional[float] = None):
        """Logits (B, T, V) when ``labels`` is None, else the mean next-token loss over labels != -100.

        ``labels`` are already aligned with ``input_ids`` (labels[t] is the token after input_ids[t]).
        With ``model.loss=fused`` the loss never materialises the (B*T, V) logits. With
        ``logprobs_temperature`` set, returns ``(logprobs, entropy)`` per token instead of the loss (the
        alignment stages' view; 0 at ignored labels), through ``llmsys.kernels.linear_logprobs`` when fused.
        """
        return self.output(self.hidden_states(input_ids, cu_seqlens), labels, logprobs_temperature)

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, cache: KVCache, use_decode_kernel: bool = False) -> torch.Tensor:
        """Logits (B, T, V) of new tokens (B, T) run at each sequence's cache position, which they fill
        (see :meth:`Decoder.cached_hidden_states`)."""
        return self.output(self.cached_hidden_states(input_ids, cache, use_decode_kernel))


def resolve_vocab_size(cfg: Architecture, tokenizer_vocab: int) -> int:
    """The embedding size for this tokenizer: the configured size, or the tokenizer's rounded up."""
    if cfg.vocab_size == 0:
        m = cfg.pad_vocab_multiple
        return m * ((tokenizer_vocab + m - 1) // m)
    if cfg.vocab_size < tokenizer_vocab:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's vocabulary "
                         f"({tokenizer_vocab}); set model.vocab_size=0 to size it from the tokenizer")
    return cfg.vocab_size


def count_parameters(cfg: Architecture) -> dict[str, int]:
    """Closed-form parameter count (unique tensors, tied embeddings counted once)."""
    d, L, V, hd = cfg.dim, cfg.n_layers, cfg.vocab_size, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + d * cfg.kv_heads * hd * 2  # wq, wo + wk, wv
    if cfg.qkv_bias:
        attn += (cfg.n_heads + 2 * cfg.kv_heads) * hd
    mlp = 3 * d * cfg.hidden_dim
    per_layer = attn + mlp + 2 * d  # two RMSNorm weights
    embedding = V * d
    output = 0 if cfg.tie_embeddings else V * d
    total = embedding + L * per_layer + d + output
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def flops_per_token(cfg: Architecture, seq_len: int) -> int:
    """Training FLOPs per token, PaLM appendix B: 6 * N + 12 * L * H * Q * T.

    N counts every weight used in a matmul: all parameters but the embedding lookup, plus the output
    projection even when it is tied (its matmul runs either way). The second term is attention's
    score and value matmuls (H heads of size Q over T positions), forward and backward. Causal
    masking is not discounted, as in PaLM and nanoGPT, so MFU is comparable with theirs.
    """
    n = count_parameters(cfg)
    matmul_params = n["non_embedding"] + (cfg.vocab_size * cfg.dim if cfg.tie_embeddings else 0)
    return 6 * matmul_params + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
