"""Fused scaled-dot-product attention (FlashAttention-2) in Triton: forward, backward, autograd, reference.

What: ``softmax(scale * Q K^T + mask) V`` without materialising the (T, T) score matrix. The forward
walks key/value blocks with the online softmax of FlashAttention-2 (Dao, 2023, "FlashAttention-2:
Faster Attention with Better Parallelism and Work Partitioning", arXiv:2307.08691, Algorithm 1):
one program per (query block, head, batch), running row max and row sum in fp32, the output rescaled
once at the end, and the per-row logsumexp (natural log, fp32) saved for the backward. Exponentials
are taken in base 2 with ``log2(e)`` folded into the scale (one FMA per score instead of a multiply
and an ``exp``).

Backward (FA2 Algorithm 2, split in three launches, no atomics, deterministic):
  1. ``_bwd_preprocess_kernel``: ``delta = rowsum(dO * O)`` in fp32, the ``D_i`` of the paper.
  2. ``_bwd_dkdv_kernel``: one program per (key block, kv head, batch) keeps its K, V block and the
     fp32 dK, dV accumulators on chip and walks the query blocks of *every query head of its group*,
     so grouped-query / multi-query dK, dV are summed on chip and written once.
  3. ``_bwd_dq_kernel``: one program per (query block, head, batch) walks the key blocks for dQ.
  What was traded: the score matrix ``Q K^T`` and ``exp`` are recomputed in both (2) and (3) (one
  extra matmul out of five) to avoid fp32 ``atomic_add`` on dQ, which is non-deterministic and needs
  an fp32 dQ buffer plus a cast.

Masking: ``causal=True`` aligns the mask bottom-right, as flash-attn >= 2.1 does: query ``i`` sees key
``j`` iff ``j <= i + Tk - Tq``. With ``Tq > Tk`` the first ``Tq - Tk`` query rows see no key; their
output (and every gradient through them) is zero and their saved logsumexp is ``+inf``. Key blocks
lying wholly above the diagonal are skipped; only blocks that straddle the diagonal or the sequence
tail pay for the mask (each kernel calls its inner loop twice, with ``MASKED`` off then on).

Layouts (flash-attn's conventions):
  dense   q ``(B, Tq, Hq, D)``, k/v ``(B, Tk, Hkv, D)`` -> out ``(B, Tq, Hq, D)``
  varlen  q ``(total, Hq, D)``, k/v ``(total, Hkv, D)`` and ``cu_seqlens`` int32 ``(num_seqs + 1,)``;
          sequence ``s`` owns tokens ``cu_seqlens[s]:cu_seqlens[s+1]`` for q and k alike (packed
          SFT batches); no token attends across a boundary. Empty sequences are allowed.
Grouped-query: ``Hkv`` divides ``Hq``; query head ``h`` reads kv head ``h // (Hq // Hkv)``.

Limits (each refused with ``ValueError``, never guessed around):
  * head_dim D a power of two in [16, 256] (it is the tile width; no masking along D).
  * fp16 and bf16 (fp32 accumulation), and fp32 (``tl.dot`` in IEEE fp32, not TF32: slow on a GPU,
    kept for exact CPU tests). q, k, v share dtype and device; the output has the input dtype.
    bf16 is refused under ``TRITON_INTERPRET=1``, whose numpy emulation of bf16 gives wrong numbers.
  * the last dim of q, k, v must be contiguous (stride 1); all other strides are passed to the
    kernels, so slices of a packed qkv projection need no copy.
  * offsets within one sequence are 32-bit: ``max_seqlen * token_stride < 2**31`` (batch, head and
    varlen offsets are 64-bit).
  * varlen: when ``max_seqlen`` is None it is computed from ``cu_seqlens`` and ``cu_seqlens`` is
    validated (one host sync); when the caller passes ``max_seqlen`` it is trusted without a sync,
    and a value below the true longest sequence silently drops the tail rows of that sequence.
  * no dropout, no ALiBi, no sliding window, no KV cache; the logsumexp is not returned.

Launch configs: autotuned on a GPU over a small per-architecture table (``_FWD_CONFIGS_SM90`` etc.),
keyed on head_dim, the power-of-two bucket of the longest sequence, and causality (plus dtypes);
configs that overflow the device's shared memory (large head_dim) are skipped by the autotuner.
No GPU was available when this was written, so the tables are starting points drawn from public
designs, to be re-measured with ``benchmarks/attention.py`` on an H100/H200 and A100. Under ``TRITON_INTERPRET=1``
(CPU) one fixed small config is used, since the interpreter cannot autotune.

``flash_attention_ref`` is the plain-PyTorch definition (matmul, mask, softmax, matmul) computed in
the input dtype, exactly what an eager PyTorch model would do; the tests run it in float64 for the
truth and in the kernel's dtype to measure PyTorch's own rounding error.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) == exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): converts the base-2 logsumexp back to natural log

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# ----------------------------------------------------------------------------------------------
# Launch configurations.
#
# Evidence: no timings (no GPU on the machine this was written on; shared-memory sizes below come
# from compiling for sm_90/sm_80 without running). The shapes follow the
# public FA2 designs: Triton's 06-fused-attention tutorial runs the forward at 128x64 (Hopper, 4-8
# warps, 3-4 stages) and the backward with a narrow query tile for dK/dV (32x128) and a narrow key
# tile for dQ (128x32); flash-attn's FA2 Triton port uses 128x64 for D <= 64 and 64x64 for D = 128
# on A100 (164 KB shared memory, hence fewer stages than H100/H200's 228 KB). Starting points for
# `benchmarks/attention.py` to tune on H100/H200 (sm_90) and A100 (sm_80).
# Each entry: (BLOCK_M, BLOCK_N, num_warps, num_stages); M indexes queries, N keys.
# ----------------------------------------------------------------------------------------------
_FWD_CONFIGS_SM90 = [
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4), (64, 32, 4, 2),
]
_FWD_CONFIGS_SM80 = [(128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 2)]
# dK/dV: one key tile is resident (BLOCK_N wide), query tiles stream past it (BLOCK_M).
_BWD_DKDV_CONFIGS_SM90 = [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 2)]
_BWD_DKDV_CONFIGS_SM80 = [(32, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2), (16, 64, 4, 2)]
# dQ: one query tile is resident (BLOCK_M), key tiles stream past it (BLOCK_N).
_BWD_DQ_CONFIGS_SM90 = [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2)]
_BWD_DQ_CONFIGS_SM80 = [(128, 32, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2), (64, 16, 4, 2)]
# The element-wise delta = rowsum(dO * O) preprocess: memory bound, one fixed tile.
_PREPROCESS_BLOCK_M = 64
# Under TRITON_INTERPRET=1: one config (the interpreter cannot benchmark). Small, unequal tiles so
# that CPU tests with sequence lengths 17..130 cross several blocks, tails and diagonal cases.
_INTERPRET_FWD = (32, 16, 4, 1)
_INTERPRET_DKDV = (16, 32, 4, 1)
_INTERPRET_DQ = (32, 16, 4, 1)
# Shared memory: configs too big for the device (large D) fail to launch with OutOfResources, which
# triton.autotune catches and skips. Evidence (compiled with Triton 3.9's ptxas for sm_90/sm_80 on a
# CPU machine, bf16, causal; shared bytes per block): forward 128x64x3 stages = 48 KB at D=128,
# 96 KB at D=256; dK/dV 64x128x3 = 97 KB at D=128, 193 KB at D=256; dQ 128x64x3 = 96 / 192 KB;
# sm_80 dK/dV 32x128x2 at D=256 = 176 KB (over A100's 163 KB, skipped). Each table keeps a small
# config that fits D=256 on A100: forward 64x32x2 (52 KB), dK/dV 32x64x3 (104 KB), dQ 64x32x3 (88 KB).


def _cuda_arch() -> int:
    if _INTERPRET or not torch.cuda.is_available():
        return 0
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def _configs(gpu_table_sm90, gpu_table_sm80, interpret_config):
    if _INTERPRET:
        table = [interpret_config]
    else:
        table = gpu_table_sm90 if _cuda_arch() >= 90 else gpu_table_sm80
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in table
    ]


# Autotune key: head_dim, the power-of-two bucket of the longest sequence (so packed batches with a
# new max length each step do not re-benchmark), and causality. The autotuner adds the dtypes.
_AUTOTUNE_KEY = ["HEAD_DIM", "SEQ_BUCKET", "IS_CAUSAL"]


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sequence_bounds(CU_SEQLENS, b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """First token (int64) and the q/k lengths of batch entry / packed sequence `b`."""
    if IS_VARLEN:
        tok0 = tl.load(CU_SEQLENS + b).to(tl.int64)
        q_len = (tl.load(CU_SEQLENS + b + 1) - tl.load(CU_SEQLENS + b)).to(tl.int32)
        k_len = q_len
    else:
        tok0 = (b * 0).to(tl.int64)
        # `+ b * 0` keeps the lengths runtime tensors even when Triton specialises a length of 1
        # into a constexpr, so both branches return the same kinds of values.
        q_len = seqlen_q + b * 0
        k_len = seqlen_k + b * 0
    return tok0, q_len, k_len


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, k_len, diag,
               qk_scale, lo, hi,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + cols[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=cols[:, None] < k_len, other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            visible = cols[None, :] < k_len
            if IS_CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no key yet keeps m = -inf; shift by 0 there so exp2 gives 0, not nan.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_shift = m_new
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=cols[:, None] < k_len, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, kv_group, sm_scale, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    tok0, q_len, k_len = _sequence_bounds(CU_SEQLENS, b, seqlen_q, seqlen_k, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    kvh = h // kv_group
    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + tok0 * stride_qt
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh + tok0 * stride_kt
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh + tok0 * stride_vt
    o_base = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + tok0 * stride_ot
    lse_base = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + tok0

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * LOG2E
    diag = k_len - q_len  # causal: query i sees key j iff j <= i + diag (bottom-right alignment)
    if IS_CAUSAL:
        hi = tl.minimum(k_len, tl.maximum(start_m + BLOCK_M + diag, 0))
        # Key blocks ending at or before the first row's diagonal need no mask.
        full_hi = tl.maximum(tl.minimum(k_len, start_m + diag + 1), 0) // BLOCK_N * BLOCK_N
    else:
        hi = k_len
        full_hi = k_len // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, k_len,
                               diag, qk_scale, 0, full_hi,
                               False, IS_CAUSAL, INPUT_PRECISION, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, k_len,
                               diag, qk_scale, full_hi, hi,
                               True, IS_CAUSAL, INPUT_PRECISION, BLOCK_N)

    # l_i == 0 exactly when a row saw no key (any visible key contributes exp2(0) = 1 at the max).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * LN2)  # natural log
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(lse_base + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA, CU_SEQLENS,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_lb, stride_lh,
    seqlen_q,
    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d] in fp32 (FA2's D_i = rowsum(dO o O))."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    tok0, q_len, _k_len = _sequence_bounds(CU_SEQLENS, b, seqlen_q, seqlen_q, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    o = tl.load(O + b64 * stride_ob + h64 * stride_oh + tok0 * stride_ot
                + offs_m[:, None] * stride_ot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + tok0 * stride_dot
                 + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b64 * stride_lb + h64 * stride_lh + tok0 + offs_m, delta, mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                    offs_n, offs_d, q_len, diag, qk_scale, lo, hi,
                    MASKED: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < q_len
        q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        # Tail rows load lse = +inf so their probabilities are exactly 0 and contribute nothing.
        lse2 = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * LOG2E
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(s_t - lse2[None, :])
        if MASKED:
            p_t = tl.where(offs_n[:, None] <= rows[None, :] + diag, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, kv_group, sm_scale, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    tok0, q_len, k_len = _sequence_bounds(CU_SEQLENS, b, seqlen_q, seqlen_k, IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= k_len:
        return
    b64 = b.to(tl.int64)
    kvh64 = kvh.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < k_len
    k = tl.load(K + b64 * stride_kb + kvh64 * stride_kh + tok0 * stride_kt
                + offs_n[:, None] * stride_kt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b64 * stride_vb + kvh64 * stride_vh + tok0 * stride_vt
                + offs_n[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * LOG2E
    diag = k_len - q_len
    if IS_CAUSAL:
        # Rows before start_n - diag see none of these keys; rows from start_n + BLOCK_N - 1 - diag on
        # see all of them, so only the query blocks in between need the mask.
        lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        mask_hi = tl.maximum(lo, (tl.maximum(start_n + BLOCK_N - 1 - diag, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
    else:
        lo = 0
        mask_hi = 0
    for g in range(0, kv_group):  # every query head that shares this kv head: GQA sums on chip
        h64 = kvh64 * kv_group + g
        q_base = Q + b64 * stride_qb + h64 * stride_qh + tok0 * stride_qt
        do_base = DO + b64 * stride_dob + h64 * stride_doh + tok0 * stride_dot
        lse_base = LSE + b64 * stride_lb + h64 * stride_lh + tok0
        delta_base = DELTA + b64 * stride_lb + h64 * stride_lh + tok0
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                 offs_n, offs_d, q_len, diag, qk_scale, lo, tl.minimum(mask_hi, q_len),
                                 IS_CAUSAL, INPUT_PRECISION, BLOCK_M)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                 offs_n, offs_d, q_len, diag, qk_scale, mask_hi, q_len,
                                 False, INPUT_PRECISION, BLOCK_M)
    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + kvh64 * stride_dkh + tok0 * stride_dkt
             + offs_n[:, None] * stride_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + b64 * stride_dvb + kvh64 * stride_dvh + tok0 * stride_dvt
             + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, k_len, diag,
                  qk_scale, lo, hi,
                  MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + cols[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=cols[:, None] < k_len, other=0.0)
            v = tl.load(v_ptrs, mask=cols[:, None] < k_len, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            visible = cols[None, :] < k_len
            if IS_CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, kv_group, sm_scale, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    tok0, q_len, k_len = _sequence_bounds(CU_SEQLENS, b, seqlen_q, seqlen_k, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    kvh = h // kv_group
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + tok0 * stride_qt
                + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + tok0 * stride_dot
                 + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + b64 * stride_lb + h64 * stride_lh + tok0 + offs_m, mask=row_ok,
                   other=float("inf")) * LOG2E
    delta = tl.load(DELTA + b64 * stride_lb + h64 * stride_lh + tok0 + offs_m, mask=row_ok, other=0.0)
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh + tok0 * stride_kt
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh + tok0 * stride_vt
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * LOG2E
    diag = k_len - q_len
    if IS_CAUSAL:  # same block ranges as the forward
        hi = tl.minimum(k_len, tl.maximum(start_m + BLOCK_M + diag, 0))
        full_hi = tl.maximum(tl.minimum(k_len, start_m + diag + 1), 0) // BLOCK_N * BLOCK_N
    else:
        hi = k_len
        full_hi = k_len // BLOCK_N * BLOCK_N
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, k_len, diag,
                       qk_scale, 0, full_hi, False, IS_CAUSAL, INPUT_PRECISION, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, k_len, diag,
                       qk_scale, full_hi, hi, True, IS_CAUSAL, INPUT_PRECISION, BLOCK_N)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + tok0 * stride_dqt
             + offs_m[:, None] * stride_dqt + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


_fwd = triton.autotune(
    configs=_configs(_FWD_CONFIGS_SM90, _FWD_CONFIGS_SM80, _INTERPRET_FWD), key=_AUTOTUNE_KEY,
)(_fwd_kernel)
_bwd_dkdv = triton.autotune(
    configs=_configs(_BWD_DKDV_CONFIGS_SM90, _BWD_DKDV_CONFIGS_SM80, _INTERPRET_DKDV), key=_AUTOTUNE_KEY,
)(_bwd_dkdv_kernel)
_bwd_dq = triton.autotune(
    configs=_configs(_BWD_DQ_CONFIGS_SM90, _BWD_DQ_CONFIGS_SM80, _INTERPRET_DQ), key=_AUTOTUNE_KEY,
)(_bwd_dq_kernel)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
class _Geometry:
    """Shapes and the (batch, token, head) strides the kernels need, for dense and varlen layouts."""

    def __init__(self, q, k, cu_seqlens, max_seqlen):
        self.varlen = cu_seqlens is not None
        if self.varlen:
            self.batch = cu_seqlens.numel() - 1
            self.seqlen_q = self.seqlen_k = max_seqlen
            self.total_q = q.shape[0]
            self.num_heads, self.head_dim = q.shape[1], q.shape[2]
            self.num_kv_heads = k.shape[1]
        else:
            self.batch, self.seqlen_q, self.num_heads, self.head_dim = q.shape
            self.seqlen_k, self.num_kv_heads = k.shape[1], k.shape[2]
        self.kv_group = self.num_heads // self.num_kv_heads

    def strides(self, t: torch.Tensor):
        """(stride_b, stride_t, stride_h); varlen tensors have no batch dim and use stride_b = 0."""
        if self.varlen:
            return 0, t.stride(0), t.stride(1)
        return t.stride(0), t.stride(1), t.stride(2)

    def lse_empty(self, device):
        """Per-row fp32 buffer for logsumexp / delta: (B, Hq, Tq) dense, (Hq, total) varlen."""
        if self.varlen:
            return torch.empty(self.num_heads, self.total_q, device=device, dtype=torch.float32)
        return torch.empty(self.batch, self.num_heads, self.seqlen_q, device=device, dtype=torch.float32)

    def lse_strides(self, lse):
        if self.varlen:
            return 0, lse.stride(0)
        return lse.stride(0), lse.stride(1)

    def seq_bucket(self):
        return triton.next_power_of_2(max(self.seqlen_q, self.seqlen_k, 1))


def _input_precision(dtype):
    # fp32 inputs would otherwise be rounded to TF32 on tensor cores; fp16/bf16 take the default.
    return "ieee" if dtype == torch.float32 else None


def _forward(q, k, v, causal, sm_scale, cu_seqlens, geo: _Geometry):
    o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = geo.lse_empty(q.device)
    cu = cu_seqlens if geo.varlen else q  # dummy pointer; never read when IS_VARLEN is False

    def grid(meta):
        return (triton.cdiv(geo.seqlen_q, meta["BLOCK_M"]), geo.num_heads, geo.batch)

    _fwd[grid](
        q, k, v, o, lse, cu,
        *geo.strides(q), *geo.strides(k), *geo.strides(v), *geo.strides(o), *geo.lse_strides(lse),
        geo.seqlen_q, geo.seqlen_k, geo.kv_group, sm_scale, geo.seq_bucket(),
        HEAD_DIM=geo.head_dim, IS_CAUSAL=causal, IS_VARLEN=geo.varlen,
        INPUT_PRECISION=_input_precision(q.dtype),
    )
    return o, lse


def _backward(do, q, k, v, o, lse, causal, sm_scale, cu_seqlens, geo: _Geometry):
    if do.stride(-1) != 1:
        do = do.contiguous()
    cu = cu_seqlens if geo.varlen else q
    delta = geo.lse_empty(q.device)
    _bwd_preprocess_kernel[(triton.cdiv(geo.seqlen_q, _PREPROCESS_BLOCK_M), geo.num_heads, geo.batch)](
        o, do, delta, cu,
        *geo.strides(o), *geo.strides(do), *geo.lse_strides(delta),
        geo.seqlen_q,
        HEAD_DIM=geo.head_dim, IS_VARLEN=geo.varlen, BLOCK_M=_PREPROCESS_BLOCK_M,
    )
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    common = dict(HEAD_DIM=geo.head_dim, IS_CAUSAL=causal, IS_VARLEN=geo.varlen,
                  INPUT_PRECISION=_input_precision(q.dtype))

    def grid_kv(meta):
        return (triton.cdiv(geo.seqlen_k, meta["BLOCK_N"]), geo.num_kv_heads, geo.batch)

    _bwd_dkdv[grid_kv](
        q, k, v, do, lse, delta, dk, dv, cu,
        *geo.strides(q), *geo.strides(k), *geo.strides(v), *geo.strides(do),
        *geo.strides(dk), *geo.strides(dv), *geo.lse_strides(lse),
        geo.seqlen_q, geo.seqlen_k, geo.kv_group, sm_scale, geo.seq_bucket(), **common,
    )

    def grid_q(meta):
        return (triton.cdiv(geo.seqlen_q, meta["BLOCK_M"]), geo.num_heads, geo.batch)

    _bwd_dq[grid_q](
        q, k, v, do, lse, delta, dq, cu,
        *geo.strides(q), *geo.strides(k), *geo.strides(v), *geo.strides(do),
        *geo.strides(dq), *geo.lse_strides(lse),
        geo.seqlen_q, geo.seqlen_k, geo.kv_group, sm_scale, geo.seq_bucket(), **common,
    )
    return dq, dk, dv


def _check_inputs(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen):
    """Validate everything the kernels assume; return (softmax_scale, max_seqlen)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"flash_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"flash_attention: dtype {q.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v must share a device, got {q.device}, {k.device}, {v.device}")
    if _INTERPRET:
        if q.dtype == torch.bfloat16:
            raise ValueError("flash_attention: bfloat16 gives wrong results under TRITON_INTERPRET=1 (CPU); "
                             "use float32 or float16 on the CPU, bfloat16 on a GPU")
    elif q.device.type != "cuda":
        raise ValueError(f"flash_attention: the Triton kernels need CUDA tensors (got {q.device}); "
                         "set TRITON_INTERPRET=1 before importing to run them on the CPU")
    if not isinstance(causal, bool):
        raise ValueError(f"flash_attention: causal must be a bool, got {causal!r}")

    dims = 3 if cu_seqlens is not None else 4
    layout = "(total, H, D) with cu_seqlens" if cu_seqlens is not None else "(B, T, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != dims:
            raise ValueError(f"flash_attention: {name} must be {layout}, got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"flash_attention: {name} must be contiguous in its last (head_dim) dim, "
                             f"got strides {t.stride()}")
    if k.shape != v.shape:
        raise ValueError(
            f"flash_attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"flash_attention: q and k head_dim differ: {head_dim} vs {k.shape[-1]}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"flash_attention: head_dim {head_dim} is not supported; use one of {SUPPORTED_HEAD_DIMS}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"flash_attention: the {hkv} kv heads must divide the {hq} query heads (GQA/MQA)")
    if q.shape[0] != k.shape[0]:
        what = "total tokens" if cu_seqlens is not None else "batch size"
        raise ValueError(f"flash_attention: q and k must have the same {what}, got {q.shape[0]} and {k.shape[0]}")

    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    softmax_scale = float(softmax_scale)
    if not math.isfinite(softmax_scale):
        raise ValueError(f"flash_attention: softmax_scale must be finite, got {softmax_scale}")

    if cu_seqlens is None:
        if max_seqlen is not None:
            raise ValueError("flash_attention: max_seqlen is only meaningful with cu_seqlens")
        longest = max(q.shape[1], k.shape[1])
    else:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
            got = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
            raise ValueError(f"flash_attention: cu_seqlens must be an int32 tensor, got {got}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"flash_attention: cu_seqlens must have shape (num_seqs + 1,), got {tuple(cu_seqlens.shape)}")
        if cu_seqlens.device != q.device:
            raise ValueError(f"flash_attention: cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
        if cu_seqlens.stride(0) != 1:
            raise ValueError("flash_attention: cu_seqlens must be contiguous")
        if max_seqlen is None:  # one host sync: compute max_seqlen and validate the offsets
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            first, last, shortest, max_seqlen = torch.stack(
                [cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max()]).tolist()
            if first != 0 or last != q.shape[0] or shortest < 0:
                raise ValueError(f"flash_attention: cu_seqlens must rise from 0 to total tokens {q.shape[0]}, "
                                 f"got first {first}, last {last}, a length of {shortest}")
        if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 0:
            raise ValueError(f"flash_attention: max_seqlen must be a non-negative int, got {max_seqlen!r}")
        longest = max_seqlen
    max_token_stride = max(t.stride(-3) for t in (q, k, v))
    if longest * max_token_stride >= 2**31:
        raise ValueError(f"flash_attention: sequence length {longest} x token stride {max_token_stride} "
                         "overflows the kernels' 32-bit in-sequence offsets")
    return softmax_scale, max_seqlen


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, cu_seqlens, max_seqlen):
        geo = _Geometry(q, k, cu_seqlens, max_seqlen)
        o, lse = _forward(q, k, v, causal, sm_scale, cu_seqlens, geo)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.geo, ctx.causal, ctx.sm_scale = geo, causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale, cu_seqlens, ctx.geo)
        return dq, dk, dv, None, None, None, None


def flash_attention(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None, max_seqlen=None):
    """Fused attention ``softmax(softmax_scale * q k^T + mask) v`` (FlashAttention-2), differentiable.

    Dense: q ``(B, Tq, Hq, D)``, k/v ``(B, Tk, Hkv, D)``. Varlen: q ``(total, Hq, D)``, k/v
    ``(total, Hkv, D)`` with ``cu_seqlens`` int32 ``(num_seqs + 1,)`` shared by q and k, and
    ``max_seqlen`` the longest sequence (computed, with one host sync, when None). ``causal`` aligns
    bottom-right (query i sees keys j <= i + Tk - Tq). ``softmax_scale`` defaults to ``1/sqrt(D)``.
    Returns a tensor shaped like q in q's dtype. See the module docstring for the limits.
    """
    softmax_scale, max_seqlen = _check_inputs(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen)
    if q.numel() == 0 or k.numel() == 0:  # no work (and a zero-sized grid); plain PyTorch does it
        return flash_attention_ref(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen)
    if cu_seqlens is not None and max_seqlen == 0:
        raise ValueError(f"flash_attention: max_seqlen is 0 but there are {q.shape[0]} tokens")
    return _FlashAttention.apply(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen)


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def _attention_ref_dense(q, k, v, causal, softmax_scale):
    """(B, Tq, Hq, D), (B, Tk, Hkv, D) -> (B, Tq, Hq, D), computed in the input dtype."""
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_kv_heads = k.shape[1], k.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"flash_attention_ref: the {num_kv_heads} kv heads must divide the {num_heads} query heads")
    group = num_heads // num_kv_heads
    qh = q.transpose(1, 2)  # (B, Hq, Tq, D)
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)  # (B, Hq, Tk, D): head h reads kv head h // group
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * softmax_scale  # (B, Hq, Tq, Tk)
    if causal:
        rows = torch.arange(seqlen_q, device=q.device)[:, None]
        cols = torch.arange(seqlen_k, device=q.device)[None, :]
        visible = cols <= rows + (seqlen_k - seqlen_q)  # bottom-right aligned, as flash-attn
        has_key = visible.any(dim=-1, keepdim=True)
        # Rows with no visible key output zero; fill them with 0 (not -inf) so softmax stays finite.
        scores = scores.masked_fill(~(visible | ~has_key), float("-inf"))
        probs = torch.softmax(scores, dim=-1) * has_key.to(scores.dtype)
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vh).transpose(1, 2)


def flash_attention_ref(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None, max_seqlen=None):
    """Plain-PyTorch attention with ``flash_attention``'s signature and semantics, autograd-differentiable.

    Computes in the input dtype (no upcast), like eager PyTorch; pass float64 tensors for a
    ground truth. Varlen inputs are split on ``cu_seqlens`` and run one sequence at a time
    (``max_seqlen`` is accepted and ignored).
    """
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is None:
        return _attention_ref_dense(q, k, v, causal, softmax_scale)
    bounds = cu_seqlens.tolist()
    outs = [
        _attention_ref_dense(q[s:e][None], k[s:e][None], v[s:e][None], causal, softmax_scale)[0]
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=0) if outs else q * 0.0
