"""KV-cache decode attention (flash-decoding): one new query token per sequence against its cache.

What: ``out[b, h] = softmax(scale * q[b, h] . K[b, :L_b]^T) V[b, :L_b]`` for a batch of sequences at
different lengths ``L_b = cache_seqlens[b]``, the attention step of batched generation (PPO rollouts).
Inference only (no autograd).

How: the CUDA kernel (``csrc/cuda/decode_attention.cu``) splits each sequence's cache into chunks
processed by separate thread blocks, each block serving *all query heads of one kv head* so a
grouped-query K/V tile is read from memory once for the group; each block leaves a partial
``(max, sum, acc)`` per query head and a second kernel merges them by log-sum-exp (Flash-Decoding, Dao
et al. 2023; the split-KV scheme of flash-attn and vLLM's paged attention v2). The split count comes
from ``decode_attention_num_splits_heuristic`` in ``csrc/include/llmsys/decode_attention.h`` (fill the
SMs, chunks >= 256 positions). The CPU twin (``csrc/cpu/decode_attention.cpp``) does the same split
and combine with OpenMP over (batch, head); ``num_splits`` forces a split count on either device, which
is how the tests check the combine arithmetic on the CPU.

Layout: q ``(B, Hq, D)``; k_cache, v_cache ``(B, S_max, Hkv, D)`` (batch, cache position, kv head,
head dim: the cache of the generation path), last dim contiguous, any other strides (a slice of a
larger cache needs no copy); cache_seqlens int32 ``(B,)`` on q's device; the new token's own k, v are
already written at position ``L_b - 1``. Grouped-query: ``Hkv`` divides ``Hq``; query head ``h`` reads kv
head ``h // (Hq // Hkv)``. Output ``(B, Hq, D)`` contiguous in q's dtype.

Limits (refused with ``ValueError``): head_dim 32, 64, 128 or 256; fp32 / fp16 / bf16, all inputs
alike (fp32 accumulation); on CUDA the rows of q, k_cache, v_cache must be 16-byte aligned (pointer and
strides), which every cache allocated by PyTorch and sliced along B, S or H is. A sequence with
``L_b = 0`` gets zeros. ``L_b`` outside ``[0, S_max]`` is refused on the CPU; on CUDA checking it would
cost a host sync per step, so the kernel clamps it into ``[0, S_max]`` instead (it never reads outside
the cache) and the caller is trusted.

``decode_attention_ref`` is the plain-PyTorch definition (mask positions ``>= L_b``, softmax, GQA by
head grouping) computed in the input dtype: the tests run it in float64 for the truth and in the
kernel's dtype to measure PyTorch's own rounding error.
"""
from __future__ import annotations

import math

import torch

SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_SPLITS = 128  # kDecodeMaxSplits in csrc/include/llmsys/decode_attention.h


def _op():
    """torch.ops.llmsys.decode_attention, building / loading llmsys._C on first use."""
    from llmsys.kernels._ext import load_extension

    load_extension()
    return torch.ops.llmsys.decode_attention


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
           num_splits: int | None) -> None:
    if q.dim() != 3:
        raise ValueError(f"decode_attention: q must be (B, Hq, D), got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention: k_cache and v_cache must both be (B, S_max, Hkv, D), got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    B, Hq, D = q.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"decode_attention: k_cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)} "
                         "in batch or head_dim")
    Hkv = k_cache.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"decode_attention: kv heads ({Hkv}) must divide query heads ({Hq})")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"decode_attention: head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {D}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"decode_attention: dtype must be float32, float16 or bfloat16, got {q.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"decode_attention: q, k_cache, v_cache must share a dtype, got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    if cache_seqlens.dtype != torch.int32 or cache_seqlens.shape != (B,):
        raise ValueError(f"decode_attention: cache_seqlens must be int32 of shape ({B},), got "
                         f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    devices = {t.device for t in (q, k_cache, v_cache, cache_seqlens)}
    if len(devices) != 1:
        raise ValueError(f"decode_attention: all inputs must be on one device, got {sorted(map(str, devices))}")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"decode_attention: only CPU and CUDA tensors are supported, got {q.device}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"decode_attention: the last dimension of {name} must be contiguous "
                             f"(stride 1), got strides {t.stride()}")
    if num_splits is not None and not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"decode_attention: num_splits must be in [1, {MAX_SPLITS}] or None, got {num_splits}")
    if q.device.type == "cpu" and B > 0:  # on CUDA this would be a host sync per step; the kernel clamps
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < 0 or hi > k_cache.shape[1]:
            raise ValueError(f"decode_attention: cache_seqlens must lie in [0, S_max={k_cache.shape[1]}], "
                             f"got values in [{lo}, {hi}]")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     softmax_scale: float | None = None, *, num_splits: int | None = None) -> torch.Tensor:
    """Attention of q ``(B, Hq, D)`` over ``k_cache[b, :cache_seqlens[b]]``, ``v_cache[...]`` ``(B, S_max, Hkv, D)``.

    ``softmax_scale`` defaults to ``1 / sqrt(D)``. ``num_splits`` forces the number of cache chunks per
    sequence (1..128); None lets the kernel choose (CUDA: the SM-filling heuristic; CPU: 1). Returns
    ``(B, Hq, D)`` in q's dtype, zeros for sequences of length 0.
    """
    _check(q, k_cache, v_cache, cache_seqlens, num_splits)
    if q.is_cuda:
        from llmsys.kernels._ext import has_cuda_kernels

        if not has_cuda_kernels():
            raise ValueError("decode_attention: llmsys._C was built without its CUDA kernels (see the message "
                             "printed when it loaded); use decode_attention_ref or CPU tensors")
    scale = float(softmax_scale) if softmax_scale is not None else None
    return _op()(q, k_cache, v_cache, cache_seqlens, scale, num_splits or 0)


def decode_attention_num_splits(batch: int, heads_q: int, heads_kv: int, max_seqlen: int,
                                sm_count: int | None = None) -> int:
    """The split count the CUDA kernel picks for this shape (``num_splits=None``) on a GPU with ``sm_count``
    SMs (default: the current CUDA device's). The heuristic lives in C++ (decode_attention.h); this asks it."""
    if sm_count is None:
        if not torch.cuda.is_available():
            raise ValueError("decode_attention_num_splits: no CUDA device to take sm_count from; pass sm_count")
        sm_count = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    _op()  # loads the extension
    return int(torch.ops.llmsys.decode_attention_num_splits(batch, heads_q, heads_kv, max_seqlen, sm_count))


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                         softmax_scale: float | None = None) -> torch.Tensor:
    """Plain PyTorch in q's dtype: scores over the whole cache, positions ``>= cache_seqlens[b]`` masked."""
    B, Hq, D = q.shape
    S_max, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    qg = q.reshape(B, Hkv, group, D)  # query head h = kv head h // group, member h % group
    scores = torch.einsum("bkgd,bskd->bkgs", qg, k_cache) * scale  # (B, Hkv, group, S_max)
    valid = torch.arange(S_max, device=q.device)[None, :] < cache_seqlens.to(q.device, torch.long)[:, None]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # an empty sequence's row is all -inf -> NaN -> zeros
    out = torch.einsum("bkgs,bskd->bkgd", probs, v_cache)
    return out.reshape(B, Hq, D)
