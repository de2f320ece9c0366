// decode_attention.h: attention of one new query token per sequence against its KV cache, split over
// the cache length and combined (flash-decoding: Dao, Haziza, Massa & Sizov 2023, "Flash-Decoding for
// long-context inference"; the same split-KV idea as flash-attn's splitkv kernel and vLLM's paged
// attention v2).
//
//   q (B, Hq, D); k_cache, v_cache (B, S_max, Hkv, D); cache_seqlens int32 (B,); out (B, Hq, D).
//   Query head h reads kv head h / (Hq / Hkv) (grouped-query attention; Hkv divides Hq).
//   Sequence b attends to cache positions [0, L_b), L_b = cache_seqlens[b]:
//     out[b, h] = softmax(scale * q[b, h] . K[b, :L_b, h_kv]) @ V[b, :L_b, h_kv]     (L_b = 0: zeros)
//
// Split and combine. The L_b positions of a sequence are cut into `num_splits` chunks of
// ceil(L_b / num_splits) positions rounded up to the kernel's key tile (the last chunks may be empty).
// Each chunk s produces, per query head, in the base-2 log domain (scores pre-multiplied by
// scale * log2(e), so exp2 replaces exp):
//   m_s = max_j x_j,   l_s = sum_j 2^(x_j - m_s),   acc_s = sum_j 2^(x_j - m_s) v_j     (empty: -inf, 0, 0)
// and the combine merges them with the log-sum-exp rule:
//   M = max_s m_s,  w_s = 2^(m_s - M),  out = sum_s w_s acc_s / sum_s w_s l_s            (sum = 0: zeros)
// With num_splits = 1 the output is written directly (acc / l) and no combine runs.
//
// Layout: strides in elements; the last dimension (D) of q, k_cache, v_cache and out is contiguous;
// every other dimension may have any stride (a cache sliced out of a larger one works). out is written
// at its own strides. dtype is that of q, k_cache, v_cache and out alike; fp32 accumulation throughout,
// the output rounded once. head_dim: 32, 64, 128 or 256; anything else is refused.
// L_b outside [0, S_max] is refused by the CPU twin; the CUDA kernel cannot report it without a host
// sync and clamps it to [0, S_max] instead (it never reads outside the cache).
//
// CPU twin: OpenMP over (batch, query head); the same chunking rule (with its own key tile, kCpuKeyTile) and the same
// combine, so forcing num_splits > 1 on the CPU tests the merge arithmetic the GPU uses.
// CUDA: csrc/cuda/decode_attention.cu (kernel design and limits in its header comment).
#pragma once

#include <cstdint>

#include "llmsys/dtypes.h"

namespace llmsys {

struct DecodeAttentionShape {
  int64_t B, Hq, Hkv, D, S_max;
  int64_t stride_qb, stride_qh;                   // q (B, Hq, D)
  int64_t stride_kb, stride_ks, stride_kh;        // k_cache (B, S_max, Hkv, D)
  int64_t stride_vb, stride_vs, stride_vh;        // v_cache (B, S_max, Hkv, D)
  int64_t stride_ob, stride_oh;                   // out (B, Hq, D)
};

// The head dims the kernels are instantiated for.
inline bool decode_attention_head_dim_supported(int64_t D) {
  return D == 32 || D == 64 || D == 128 || D == 256;
}

// Upper bound on num_splits (workspace and combine cost grow with it; 128 chunks of a 32k cache are
// 256 positions each, below which a split does too little work to pay for its partial results).
constexpr int kDecodeMaxSplits = 128;

// Query heads of one kv group served by one CUDA block; larger groups take several blocks (group tiles).
constexpr int kDecodeMaxGroupTile = 8;

// The CPU twin's key tile: chunk lengths are rounded up to it (as the GPU rounds to its key tile).
constexpr int64_t kCpuKeyTile = 16;

#ifndef LLMSYS_HOST_DEVICE
#if defined(__CUDACC__)
#define LLMSYS_HOST_DEVICE __host__ __device__
#else
#define LLMSYS_HOST_DEVICE
#endif
#endif

// Chunk of sequence b for split s: [s * chunk, min((s + 1) * chunk, L)), chunk = roundup(ceil(L / n), tile).
// Shared by the CPU twin and the CUDA kernel.
LLMSYS_HOST_DEVICE inline int64_t decode_attention_chunk_len(int64_t L, int64_t num_splits, int64_t tile) {
  const int64_t per = (L + num_splits - 1) / num_splits;
  return (per + tile - 1) / tile * tile;
}

// num_splits: 0 = choose (CPU: 1, since OpenMP over (batch, head) already fills the cores), else
// 1..kDecodeMaxSplits. softmax_scale is applied to q . k before the softmax.
Status decode_attention_cpu(DType dtype, const void* q, const void* k_cache, const void* v_cache,
                            const int32_t* cache_seqlens, void* out, const DecodeAttentionShape& shape,
                            float softmax_scale, int num_splits);

// The split-count heuristic of the CUDA path (flash-decoding). One split of one (sequence, kv head,
// query-head tile) is one 128-thread block; without splitting a decode step launches only
// B * Hkv * group_tiles blocks, e.g. 4 at batch 1 with 4 kv heads, on a GPU with 132 SMs. So: split the
// cache until the grid holds kDecodeTargetBlocksPerSm blocks per SM, but never into chunks shorter than
// kDecodeMinKeysPerSplit positions of the cache capacity S_max, and never more than kDecodeMaxSplits.
// Evidence: occupancy arithmetic, not yet a measurement (the session that wrote it had no GPU): the
// split kernel keeps <= 47 KB of shared memory and 128 threads per block, so 4 blocks fit per H100/H200
// SM (228 KB), and a 256-position chunk is >= 8 key tiles, enough to hide the two-stage cp.async
// pipeline's fill. benchmarks/decode.py records the chosen split count per point; tune these there.
constexpr int kDecodeTargetBlocksPerSm = 4;
constexpr int64_t kDecodeMinKeysPerSplit = 256;

inline int decode_attention_num_splits_heuristic(int64_t B, int64_t Hkv, int64_t group_tiles, int64_t S_max,
                                                 int sm_count) {
  const int64_t base = B * Hkv * group_tiles;
  const int64_t target = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * kDecodeTargetBlocksPerSm;
  if (base <= 0 || base >= target) return 1;
  int64_t splits = (target + base - 1) / base;
  const int64_t by_length = (S_max + kDecodeMinKeysPerSplit - 1) / kDecodeMinKeysPerSplit;
  if (splits > by_length) splits = by_length;
  if (splits > kDecodeMaxSplits) splits = kDecodeMaxSplits;
  return splits < 1 ? 1 : static_cast<int>(splits);
}

}  // namespace llmsys

#if defined(__CUDACC__) || defined(LLMSYS_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace llmsys {

// The launch plan on the current device: the split count (num_splits_requested, or the heuristic when
// it is 0) and the size in floats of the fp32 workspace decode_attention_cuda needs (0 when
// num_splits = 1). Refuses unsupported shapes and dtypes with a message.
Status decode_attention_cuda_plan(DType dtype, const DecodeAttentionShape& shape, int num_splits_requested,
                                  int* num_splits, int64_t* workspace_floats);

// workspace: at least workspace_floats floats of device memory from the plan (contents ignored; may be
// null when that is 0). num_splits: the plan's. q, k_cache, v_cache need 16-byte aligned rows (pointers
// and the strides over B, S, H times the element size multiples of 16 bytes); refused otherwise.
Status decode_attention_cuda(DType dtype, const void* q, const void* k_cache, const void* v_cache,
                             const int32_t* cache_seqlens, void* out, const DecodeAttentionShape& shape,
                             float softmax_scale, int num_splits, float* workspace, cudaStream_t stream);

}  // namespace llmsys
#endif
