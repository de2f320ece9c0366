"""Fused LM-head + cross-entropy / log-probs that never hold the full (tokens x vocab) logits.

What: ``fused_linear_cross_entropy(hidden, weight, targets)`` equals
``F.cross_entropy((hidden @ weight.T).float(), targets)`` and ``linear_logprobs(hidden, weight,
targets, temperature)`` returns per-token ``log p(target)`` and entropy of ``softmax(logits / T)``,
both differentiable w.r.t. ``hidden`` and ``weight`` (the weight may be the tied embedding).

Why: an LM head's logits are N x V; at 16k tokens x 128k vocab that is 8 GiB of fp32 per
micro-batch, more than the rest of a mid-size model's activations. Following Liger-Kernel's fused
linear cross entropy and Wijmans et al. 2024 ("Cut Your Losses in Large-Vocabulary Language
Models"), the tokens are processed in chunks; only one chunk of logits exists at a time.

Algorithm, per chunk of C token rows (C from ``LOGITS_CHUNK_BYTES``):
  1. ``logits = h_c @ W.T`` with torch (cuBLAS), (C, V) in the input dtype - the same rounding as
     the reference ``(hidden @ weight.T).float()``.
  2. One Triton program per row streams the vocabulary in ``BLOCK_V`` blocks with an online
     logsumexp (Milakov & Gimelshein 2018) - and, for ``linear_logprobs``, the running
     ``sum p * (z - max)`` for the entropy - all in fp32.
  3. Cross entropy with a scalar loss (mean/sum): a second sweep of the same program overwrites the
     logits in place with ``softmax - onehot``, so ``grad_h_c = dlogits @ W`` and
     ``grad_W += dlogits.T @ h_c`` are done in the forward pass and the chunk is freed. The backward
     only multiplies the stored gradients by ``grad_output`` (and 1 / n_valid for mean): 2 GEMMs
     over the vocabulary are saved versus recomputing.
  4. reduction="none" and ``linear_logprobs`` take arbitrary per-token upstream gradients, and
     ``grad_W = sum_i g_i dlogits_i^T h_i`` cannot be rescaled after the sum over tokens, so their
     forward keeps only the per-token logsumexp (and entropy), and the backward recomputes each
     chunk's logits and runs the gradient kernel (``dlogp/dz = onehot - p``,
     ``dH/dz_j = -p_j (log p_j + H)``, both / T), then the two GEMMs.

Memory beyond inputs and outputs (N tokens, e = bytes of the input dtype):
    C * V * e                      one chunk of logits / dlogits, C = LOGITS_CHUNK_BYTES // (V * e)
  + V * H * 4                      fp32 grad_weight accumulator, during the forward only (if > 1
                                   chunk, e < 4 and ACCUMULATE_GRAD_WEIGHT_FP32)
  + GRAD_WEIGHT_SLICE_BYTES        per-slice temporary of that half-precision accumulation
  + N * H * e + V * H * e          (mean/sum, training) gradients held from forward to backward,
                                   scaled in place by the backward (no further copy)
  + O(N) fp32                      per-token logsumexp / entropy / losses
It never allocates O(N * V).

Limits and trades:
  * vocab chunked by ``BLOCK_V`` (<= 4096 columns) inside the kernel; the GEMMs are chunked over
    tokens only, so one chunk holds at least one full row of V logits (fine up to V ~ 10^8).
  * mean/sum hold grad_hidden and grad_weight (input dtypes) from forward to backward; the backward
    pass is then almost free. With ``torch.no_grad()`` or inputs that need no grad, no gradient work
    is done at all. Ignored tokens (targets == ignore_index) are dropped before any GEMM.
  * gradients are stored unscaled (softmax - onehot, |x| <= 1) in the input dtype and scaled in
    the backward, so fp16 does not underflow on 1 / n_valid; the logprobs backward writes the
    upstream-scaled dlogits in the input dtype (as PyTorch's own half-precision autograd does).
  * fp32 accumulation: kernel math in fp32; GEMMs accumulate in fp32 (cuBLAS); grad_weight summed
    over chunks in fp32, each chunk's fp16/bf16 GEMM output rounded once before the sum (torch has
    no portable fp16 x fp16 -> fp32 ``addmm``; ``torch.mm(out_dtype=)`` is CUDA-only and a
    candidate to remove the slice temporaries). ``ACCUMULATE_GRAD_WEIGHT_FP32 = False`` trades
    that for Liger's in-dtype ``addmm_`` when the 4 * V * H bytes do not fit.
  * mean/sum: a second backward through the same graph (retain_graph=True) raises, because the
    first scaled the stored gradients in place.
  * the losses / log-probs / entropies are fp32 (as the reference); grads are in the input dtypes.
  * autocast is switched off inside: the GEMMs run in the dtype of hidden/weight as given (cast
    them yourself; mixed dtypes are refused).
  * Triton's CPU interpreter stores bf16 by truncation, not round-to-nearest (a 1-ulp bias the
    bf16 tests catch), so under ``TRITON_INTERPRET=1`` a bf16 chunk is staged through an exact
    fp32 copy for the kernel; the GPU path works on the bf16 chunk in place.
  * no double backward (``once_differentiable``); fp32 GEMMs follow torch's TF32 setting.
  * validation costs one host sync (min/max of targets and the valid count), plus a ``nonzero``
    when some tokens are ignored.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

# ---------------------------------------------------------------------------------------------
# Launch heuristics. No GPU was available when these were written: they are starting points from
# the public designs below, to be tuned with benchmarks/cross_entropy.py on an H100/H200.
# ---------------------------------------------------------------------------------------------

# Bytes of one chunk of logits (C x V in the input dtype). 512 MiB gives C = 2048 rows at V = 128k
# in bf16 (C x V x H GEMMs of ~2 TFLOP at H = 4096, well past the size where cuBLAS saturates an
# H100) while staying 16x below the 8 GiB of full fp32 logits at 16k tokens. Liger-Kernel sizes
# its chunks so the logits chunk is about the size of the hidden input; we bound bytes instead so
# the memory claim is a constant. The tests monkeypatch this to force many chunks.
LOGITS_CHUNK_BYTES = 512 * 2**20

# Above this many rows a chunk is rounded down to a multiple of it, so GEMM tiles (128 on Hopper
# cuBLAS kernels) are full.
CHUNK_ROW_MULTIPLE = 128

# Columns per kernel iteration. One program owns one row; 4096 fp32 values over 8 warps is 16
# registers per thread per live vector. Evidence so far (no GPU run yet): compiled offline for
# sm_90 with Triton 3.9, the heaviest variants (bf16, entropy + in-place grad; the two-output
# grad kernel) use 53 and 44 registers with no local-memory spills. Liger uses up to 32k columns
# with 32 warps on the same one-row-per-program layout; the online logsumexp needs no whole-row
# residency, so a smaller block costs only loop trips.
BLOCK_V_MAX = 4096
NUM_WARPS = 8

# Temporary for one vocab slice of the half-precision grad_weight GEMM (slice x H in the input
# dtype) before it is added into the fp32 accumulator; bounds that transient to 256 MiB.
GRAD_WEIGHT_SLICE_BYTES = 256 * 2**20

# Sum half-precision grad_weight over chunks in an fp32 (V, H) buffer (4 * V * H bytes, 2 GiB at
# V = 128k, H = 4096, alive during the forward). False accumulates in the weight dtype with
# ``addmm_`` (Liger's choice): no extra buffer, one rounding per chunk in the running sum.
ACCUMULATE_GRAD_WEIGHT_FP32 = True

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REDUCTIONS = ("mean", "sum", "none")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------
# Triton kernels. Logits are (C, V) row-major: stride_lc between rows, unit stride along V.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _softmax_stats_kernel(
    logits_ptr, stride_lc,  # (C, V), overwritten with dloss/dlogits when WRITE_GRAD
    targets_ptr,  # (C,) int64, all in [0, V)
    lse_ptr, logp_ptr, ent_ptr,  # (C,) fp32 outputs (ent only when COMPUTE_ENTROPY)
    V, inv_temp,
    BLOCK_V: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    """Per row: lse = logsumexp(z), logp = z[t] - lse, entropy, with z = logits * inv_temp."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_lc
    target = tl.load(targets_ptr + row)

    # Running max m, s = sum exp(z - m), u = sum exp(z - m) * (z - m). Starting m at a large finite
    # negative (not -inf) keeps 0 * (m_old - m_new) finite in the first rescale of u.
    m = -1e30
    s = 0.0
    u = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)  # 0 on masked lanes
        if COMPUTE_ENTROPY:
            # Shift u from base m to base m_new: (z - m) = (z - m_new) + (m_new - m).
            d = tl.where(mask, z - m_new, 0.0)  # not -inf: keeps 0 * d finite on masked lanes
            u = alpha * (u + s * (m - m_new)) + tl.sum(e * d, axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new

    lse = m + tl.log(s)
    z_target = tl.load(row_ptr + target).to(tl.float32) * inv_temp
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, z_target - lse)
    if COMPUTE_ENTROPY:
        # H = -sum p log p = lse - E[z] = log s - u / s (both terms small: no cancellation at m).
        tl.store(ent_ptr + row, tl.log(s) - u / s)

    if WRITE_GRAD:
        # d(lse - z[t]) / dlogits = (softmax - onehot) * inv_temp, unscaled by the upstream grad.
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
            p = tl.exp(z - lse)
            g = tl.where(cols == target, p - 1.0, p) * inv_temp
            tl.store(row_ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _logits_grad_kernel(
    logits_ptr, stride_lc,  # (C, V), overwritten with dL/dlogits
    targets_ptr,  # (C,) int64
    lse_ptr, ent_ptr,  # (C,) fp32 saved by the forward
    g_logp_ptr, g_ent_ptr,  # (C,) fp32 upstream gradients
    V, inv_temp,
    BLOCK_V: tl.constexpr,
    HAS_G_LOGP: tl.constexpr,
    HAS_G_ENT: tl.constexpr,
):
    """dL/dz_j = g_logp (onehot_j - p_j) - g_ent p_j (log p_j + H); dL/dlogits = dL/dz * inv_temp."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_lc
    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    g_logp = 0.0
    if HAS_G_LOGP:
        g_logp = tl.load(g_logp_ptr + row)
    g_ent = 0.0
    ent = 0.0
    if HAS_G_ENT:
        g_ent = tl.load(g_ent_ptr + row)
        ent = tl.load(ent_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
        logp = z - lse
        p = tl.exp(logp)
        dz = tl.zeros([BLOCK_V], dtype=tl.float32)
        if HAS_G_LOGP:
            dz += tl.where(cols == target, g_logp, 0.0) - g_logp * p
        if HAS_G_ENT:
            dz -= g_ent * p * (logp + ent)
        tl.store(row_ptr + cols, (dz * inv_temp).to(logits_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers: check what the kernels assume, refuse anything else.
# ---------------------------------------------------------------------------------------------


def _kernel_dtypes() -> tuple[torch.dtype, ...]:
    # The CPU interpreter mis-handles bf16 memory; callers stage bf16 through fp32 there.
    return (torch.float32, torch.float16) if _interpreting() else _FLOAT_DTYPES


def _block_v(V: int) -> int:
    return min(BLOCK_V_MAX, triton.next_power_of_2(V))


def _check_logits_buffer(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits chunk must be 2-D with unit stride along the vocabulary, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    if logits.dtype not in _kernel_dtypes():
        raise ValueError(f"logits chunk dtype {logits.dtype} is not supported by the kernel here")
    if targets.dtype != torch.int64 or targets.shape != (logits.shape[0],) or not targets.is_contiguous():
        raise ValueError(f"targets must be contiguous int64 of shape ({logits.shape[0]},), got "
                         f"{targets.dtype} {tuple(targets.shape)}")


def _launch_softmax_stats(logits, targets, inv_temp, *, compute_entropy, write_grad):
    """-> (lse, logp, entropy or None), fp32 (C,). Overwrites logits with the CE grad if write_grad."""
    _check_logits_buffer(logits, targets)
    C, V = logits.shape
    lse = torch.empty(C, device=logits.device, dtype=torch.float32)
    logp = torch.empty_like(lse)
    ent = torch.empty_like(lse) if compute_entropy else lse  # unused pointer when not computed
    _softmax_stats_kernel[(C,)](
        logits, logits.stride(0), targets, lse, logp, ent, V, float(inv_temp),
        BLOCK_V=_block_v(V), COMPUTE_ENTROPY=compute_entropy, WRITE_GRAD=write_grad,
        num_warps=NUM_WARPS,
    )
    return lse, logp, (ent if compute_entropy else None)


def _launch_logits_grad(logits, targets, lse, ent, g_logp, g_ent, inv_temp) -> None:
    """Overwrite logits (C, V) in place with dL/dlogits for per-row upstream grads (fp32 or None)."""
    _check_logits_buffer(logits, targets)
    C, V = logits.shape
    for name, t in (("lse", lse), ("entropy", ent), ("g_logp", g_logp), ("g_ent", g_ent)):
        if t is not None and (t.dtype != torch.float32 or t.shape != (C,) or not t.is_contiguous()):
            raise ValueError(f"{name} must be contiguous fp32 of shape ({C},)")
    if g_ent is not None and ent is None:
        raise ValueError("an entropy gradient needs the forward's entropy")
    _logits_grad_kernel[(C,)](
        logits, logits.stride(0), targets, lse,
        ent if ent is not None else lse,
        g_logp if g_logp is not None else lse,
        g_ent if g_ent is not None else lse,
        V, float(inv_temp),
        BLOCK_V=_block_v(V), HAS_G_LOGP=g_logp is not None, HAS_G_ENT=g_ent is not None,
        num_warps=NUM_WARPS,
    )


# ---------------------------------------------------------------------------------------------
# Chunk loop shared by both ops.
# ---------------------------------------------------------------------------------------------


def _chunk_rows(n_rows: int, V: int, dtype: torch.dtype) -> int:
    elt = torch.finfo(dtype).bits // 8
    rows = max(1, LOGITS_CHUNK_BYTES // (V * elt))
    if rows >= CHUNK_ROW_MULTIPLE:
        rows -= rows % CHUNK_ROW_MULTIPLE
    return max(1, min(rows, n_rows))


class _Chunks:
    """The selected rows of hidden (all rows, or those in ``rows``) in chunks, with their grads.

    ``rows`` is None (every row) or an int64 index; ``targets`` are already the selected rows'.
    """

    def __init__(self, hidden, weight, rows, targets, need_h, need_w):
        self.hidden, self.weight, self.rows, self.targets = hidden, weight, rows, targets
        self.n = targets.shape[0]
        V, H = weight.shape
        self.step = _chunk_rows(max(self.n, 1), V, hidden.dtype)
        self.grad_hidden = None
        self.grad_weight = None
        self._acc = None  # fp32 grad_weight accumulator when the weight is half precision
        if need_h:
            alloc = torch.zeros if rows is not None else torch.empty  # ignored rows stay zero
            self.grad_hidden = alloc(hidden.shape, device=hidden.device, dtype=hidden.dtype)
        if need_w:
            many = self.n > self.step
            if weight.dtype == torch.float32 or not many or not ACCUMULATE_GRAD_WEIGHT_FP32:
                self.grad_weight = torch.zeros(V, H, device=weight.device, dtype=weight.dtype)
            else:
                self._acc = torch.zeros(V, H, device=weight.device, dtype=torch.float32)

    def ranges(self):
        return [(c0, min(c0 + self.step, self.n)) for c0 in range(0, self.n, self.step)]

    def logits(self, c0, c1):
        """-> (h_c (C, H), logits (C, V)) for rows c0:c1, the buffer the kernel works in."""
        if self.rows is None:
            h_c = self.hidden[c0:c1]
        else:
            h_c = self.hidden.index_select(0, self.rows[c0:c1])
        logits = torch.mm(h_c, self.weight.t())  # input dtype, fp32 accumulate
        if logits.dtype not in _kernel_dtypes():
            logits = logits.float()  # interpreter-only bf16 staging (exact)
        return h_c, logits

    def add_grads(self, c0, c1, h_c, dlogits):
        """dlogits (C, V) for rows c0:c1 -> grad_hidden rows and grad_weight += dlogits.T @ h_c."""
        dlogits = dlogits.to(h_c.dtype)
        if self.grad_hidden is not None:
            if self.rows is None:
                torch.mm(dlogits, self.weight, out=self.grad_hidden[c0:c1])  # (C, H)
            else:
                self.grad_hidden.index_copy_(0, self.rows[c0:c1], torch.mm(dlogits, self.weight))
        if self.grad_weight is not None:
            self.grad_weight.addmm_(dlogits.t(), h_c)
        elif self._acc is not None:
            V, H = self._acc.shape
            elt = torch.finfo(h_c.dtype).bits // 8
            vs = max(1, GRAD_WEIGHT_SLICE_BYTES // (H * elt))
            for v0 in range(0, V, vs):
                self._acc[v0:v0 + vs] += torch.mm(dlogits[:, v0:v0 + vs].t(), h_c)

    def grads(self):
        if self._acc is not None:
            self.grad_weight = self._acc.to(self.weight.dtype)
            self._acc = None
        return self.grad_hidden, self.grad_weight


def _forward_pass(hidden, weight, rows, targets, inv_temp, *, compute_entropy,
                  need_h=False, need_w=False):
    """Stats for the selected rows; with need_h/need_w also the unscaled CE gradients (T = 1 use).

    -> (lse, logp, entropy or None, grad_hidden or None, grad_weight or None)
    """
    with torch.autocast(hidden.device.type, enabled=False):
        return _forward_chunks(hidden, weight, rows, targets, inv_temp, compute_entropy, need_h, need_w)


def _forward_chunks(hidden, weight, rows, targets, inv_temp, compute_entropy, need_h, need_w):
    chunks = _Chunks(hidden, weight, rows, targets, need_h, need_w)
    write_grad = need_h or need_w
    lse = torch.empty(chunks.n, device=hidden.device, dtype=torch.float32)
    logp = torch.empty_like(lse)
    ent = torch.empty_like(lse) if compute_entropy else None
    for c0, c1 in chunks.ranges():
        h_c, logits = chunks.logits(c0, c1)
        l, lp, e = _launch_softmax_stats(logits, targets[c0:c1], inv_temp,
                                         compute_entropy=compute_entropy, write_grad=write_grad)
        lse[c0:c1], logp[c0:c1] = l, lp
        if compute_entropy:
            ent[c0:c1] = e
        if write_grad:
            chunks.add_grads(c0, c1, h_c, logits)
        del logits  # before the next chunk's GEMM allocates: one chunk alive at a time
    return (lse, logp, ent, *chunks.grads())


def _backward_pass(hidden, weight, rows, targets, lse, ent, g_logp, g_ent, inv_temp, need_h, need_w):
    """Recompute each chunk's logits, turn them into dL/dlogits, and reduce to (grad_h, grad_W)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return _backward_chunks(hidden, weight, rows, targets, lse, ent, g_logp, g_ent, inv_temp,
                                need_h, need_w)


def _backward_chunks(hidden, weight, rows, targets, lse, ent, g_logp, g_ent, inv_temp, need_h, need_w):
    chunks = _Chunks(hidden, weight, rows, targets, need_h, need_w)
    for c0, c1 in chunks.ranges():
        h_c, logits = chunks.logits(c0, c1)
        _launch_logits_grad(
            logits, targets[c0:c1], lse[c0:c1],
            ent[c0:c1] if ent is not None else None,
            g_logp[c0:c1] if g_logp is not None else None,
            g_ent[c0:c1] if g_ent is not None else None,
            inv_temp,
        )
        chunks.add_grads(c0, c1, h_c, logits)
        del logits  # before the next chunk's GEMM allocates
    return chunks.grads()


# ---------------------------------------------------------------------------------------------
# Validation (shared by the ops and their references).
# ---------------------------------------------------------------------------------------------


def _validate(hidden, weight, targets, what: str):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        raise ValueError(f"{what}: hidden must be (N, H) or (B, T, H), "
                         f"got {getattr(hidden, 'shape', hidden)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{what}: weight must be (V, H), got {getattr(weight, 'shape', weight)}")
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(f"{what}: hidden's last dim {H} != weight's dim 1 ({weight.shape[1]}); "
                         f"weight must be (V, H) as nn.Linear(H, V).weight")
    if weight.shape[0] < 1:
        raise ValueError(f"{what}: empty vocabulary (weight has 0 rows)")
    rows = hidden.numel() // H if H else math.prod(hidden.shape[:-1])
    if not isinstance(targets, torch.Tensor) or not (
        targets.shape == hidden.shape[:-1] or (targets.dim() == 1 and targets.shape[0] == rows)
    ):
        raise ValueError(f"{what}: targets shape {getattr(targets, 'shape', targets)} does not match "
                         f"hidden's leading dims {tuple(hidden.shape[:-1])} ({rows} rows)")
    if targets.dtype != torch.int64:
        raise ValueError(f"{what}: targets must be int64 (torch.long), got {targets.dtype}")
    if hidden.dtype not in _FLOAT_DTYPES and hidden.dtype != torch.float64:
        raise ValueError(f"{what}: hidden dtype {hidden.dtype} is not floating point")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{what}: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"{what}: hidden ({hidden.device}), weight ({weight.device}) and targets "
                         f"({targets.device}) must be on one device")


def _validate_kernel_inputs(hidden, what: str):
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{what}: dtype {hidden.dtype} unsupported; use float32, float16 or bfloat16 "
                         f"(float64 only in the *_ref functions)")
    if hidden.device.type != "cuda" and not _interpreting():
        raise ValueError(f"{what}: tensors on {hidden.device} need a CUDA device, or TRITON_INTERPRET=1 "
                         f"set before llmsys.kernels is imported (CPU interpreter, slow)")


def _target_stats(targets1d: torch.Tensor, V: int, ignore_index: int | None, what: str):
    """One host sync: -> (valid mask or None, n_valid). Raises on ids outside [0, V)."""
    n = targets1d.shape[0]
    if n == 0:
        return None, 0
    if ignore_index is None:
        valid = None
        checked = targets1d
        count = torch.tensor(n, device=targets1d.device)
    else:
        valid = targets1d != ignore_index
        checked = torch.where(valid, targets1d, 0)
        count = valid.sum()
    lo, hi = torch.aminmax(checked)
    lo, hi, n_valid = torch.stack([lo, hi, count]).tolist()
    if lo < 0 or hi >= V:
        bad = lo if lo < 0 else hi
        extra = "" if ignore_index is None else f" (other than ignore_index={ignore_index})"
        raise ValueError(f"{what}: target id {bad} is outside the vocabulary [0, {V}){extra}")
    return valid, n_valid


def _scatter_rows(values: torch.Tensor, rows, n: int) -> torch.Tensor:
    """Per-selected-row values -> (n,) with zeros at the rows not selected (ignored tokens)."""
    if rows is None:
        return values
    return torch.zeros(n, device=values.device, dtype=values.dtype).index_copy_(0, rows, values)


# ---------------------------------------------------------------------------------------------
# autograd.Functions
# ---------------------------------------------------------------------------------------------


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """hidden (N, H), weight (V, H), targets (N,) -> loss: () for mean/sum, (N,) fp32 for none."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, n_valid, reduction):
        # rows: int64 index of non-ignored tokens, or None when none is ignored.
        tv = targets if rows is None else targets.index_select(0, rows)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.reduction, ctx.n_valid, ctx.n_rows = reduction, n_valid, hidden.shape[0]
        if reduction == "none":
            lse, logp, _, _, _ = _forward_pass(hidden, weight, rows, tv, 1.0, compute_entropy=False)
            ctx.save_for_backward(hidden, weight, tv, rows, lse)
            return _scatter_rows(-logp, rows, hidden.shape[0])
        _, logp, _, grad_h, grad_w = _forward_pass(hidden, weight, rows, tv, 1.0, compute_entropy=False,
                                                   need_h=need_h, need_w=need_w)
        ctx.save_for_backward(grad_h, grad_w)
        total = -logp.sum()
        return total / max(n_valid, 1) if reduction == "mean" else total

    @staticmethod
    @once_differentiable  # the backward's own ops are not differentiated (no double backward)
    def backward(ctx, grad_out):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.reduction == "none":
            hidden, weight, tv, rows, lse = ctx.saved_tensors
            g = grad_out if rows is None else grad_out.index_select(0, rows)
            g_logp = (-g).float().contiguous()  # loss = -logp
            grad_h, grad_w = _backward_pass(hidden, weight, rows, tv, lse, None, g_logp, None, 1.0,
                                            need_h, need_w)
        else:
            grad_h, grad_w = ctx.saved_tensors
            scale = grad_out / max(ctx.n_valid, 1) if ctx.reduction == "mean" else grad_out
            # In place: no second (V, H) copy at the start of the backward, when memory peaks. A
            # second backward through the same graph (retain_graph=True) then fails the saved
            # tensors' version check instead of returning rescaled gradients.
            if grad_h is not None:
                grad_h.mul_(scale)
            if grad_w is not None:
                grad_w.mul_(scale)
        return grad_h, grad_w, None, None, None, None


class _LinearLogprobs(torch.autograd.Function):
    """hidden (N, H), weight (V, H), targets (N,) -> (logp (N,), entropy (N,)) fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp):
        lse, logp, ent, _, _ = _forward_pass(hidden, weight, None, targets, inv_temp, compute_entropy=True)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.inv_temp = inv_temp
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    @once_differentiable  # the backward's own ops are not differentiated (no double backward)
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if g_logp is None and g_ent is None:
            return None, None, None, None
        g_logp = g_logp.float().contiguous() if g_logp is not None else None
        g_ent = g_ent.float().contiguous() if g_ent is not None else None
        grad_h, grad_w = _backward_pass(hidden, weight, None, targets, lse, ent, g_logp, g_ent,
                                        ctx.inv_temp, need_h, need_w)
        return grad_h, grad_w, None, None


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index, reduction)`` without the logits.

    hidden (N, H) or (B, T, H); weight (V, H) (e.g. ``lm_head.weight``, possibly the tied
    embedding); targets (N,) or (B, T) int64. mean divides by the number of non-ignored tokens and
    is 0 (with zero grads) when all are ignored. reduction="none" returns fp32 losses shaped like
    targets, 0 at ignored positions. Scalar losses are fp32.
    """
    what = "fused_linear_cross_entropy"
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{what}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _validate(hidden, weight, targets, what)
    _validate_kernel_inputs(hidden, what)
    H, V = hidden.shape[-1], weight.shape[0]
    h2 = hidden.reshape(-1, H)
    t1 = targets.reshape(-1).contiguous()
    valid, n_valid = _target_stats(t1, V, ignore_index, what)
    rows = None if n_valid == t1.shape[0] else valid.nonzero().squeeze(1)

    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss = _FusedLinearCrossEntropy.apply(h2, weight, t1, rows, n_valid, reduction)
    else:  # inference / eval: no gradient work at all
        with torch.no_grad():
            tv = t1 if rows is None else t1.index_select(0, rows)
            _, logp, _, _, _ = _forward_pass(h2, weight, rows, tv, 1.0, compute_entropy=False)
            if reduction == "none":
                loss = _scatter_rows(-logp, rows, t1.shape[0])
            else:
                loss = -logp.sum()
                if reduction == "mean":
                    loss = loss / max(n_valid, 1)
    return loss.reshape(targets.shape) if reduction == "none" else loss


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log softmax(hidden @ weight.T / T)[target]`` and entropy, fp32, shaped like targets.

    Differentiable w.r.t. hidden and weight for any upstream gradients on both outputs. Every target
    must be a valid id in [0, V): there is no ignore_index - pass any valid id (e.g. 0) at padded
    positions and mask the outputs afterwards.
    """
    what = "linear_logprobs"
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{what}: temperature must be a finite float > 0, got {temperature!r}")
    _validate(hidden, weight, targets, what)
    _validate_kernel_inputs(hidden, what)
    H, V = hidden.shape[-1], weight.shape[0]
    h2 = hidden.reshape(-1, H)
    t1 = targets.reshape(-1).contiguous()
    _target_stats(t1, V, None, what)
    inv_temp = 1.0 / float(temperature)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        logp, ent = _LinearLogprobs.apply(h2, weight, t1, inv_temp)
    else:
        with torch.no_grad():
            _, logp, ent, _, _ = _forward_pass(h2, weight, None, t1, inv_temp, compute_entropy=True)
    return logp.reshape(targets.shape), ent.reshape(targets.shape)


# ---------------------------------------------------------------------------------------------
# References: plain PyTorch, materialise the logits, autograd-differentiable.
# ---------------------------------------------------------------------------------------------


def _ref_logits(hidden, weight):
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    return logits.to(torch.promote_types(logits.dtype, torch.float32))  # float(); fp64 stays fp64


def fused_linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy on the full logits; mean over non-ignored tokens (0 when there are none)."""
    what = "fused_linear_cross_entropy_ref"
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{what}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _validate(hidden, weight, targets, what)
    logits = _ref_logits(hidden, weight)
    t1 = targets.reshape(-1)
    _target_stats(t1, weight.shape[0], ignore_index, what)
    if reduction == "none":
        return F.cross_entropy(logits, t1, ignore_index=ignore_index, reduction="none").reshape(targets.shape)
    total = F.cross_entropy(logits, t1, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / (t1 != ignore_index).sum().clamp(min=1)


def linear_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """log_softmax of the full logits / T at the targets, and the softmax entropy."""
    what = "linear_logprobs_ref"
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{what}: temperature must be a finite float > 0, got {temperature!r}")
    _validate(hidden, weight, targets, what)
    t1 = targets.reshape(-1)
    _target_stats(t1, weight.shape[0], None, what)
    logp_all = torch.log_softmax(_ref_logits(hidden, weight) / temperature, dim=-1)
    logp = logp_all.gather(1, t1[:, None]).squeeze(1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp.reshape(targets.shape), ent.reshape(targets.shape)
