// decode_attention.cu: KV-cache decode attention, split over the cache length and combined
// (flash-decoding; Dao, Haziza, Massa & Sizov 2023). Math, layout and the split heuristic are in
// csrc/include/llmsys/decode_attention.h; the CPU twin is csrc/cpu/decode_attention.cpp.
//
// Why split: a decode step has one query row per (sequence, head), so one block per (sequence, kv head)
// leaves most SMs idle at small batch (4 blocks at batch 1 with 4 kv heads, on 132 SMs) while each block
// streams a long cache alone. Cutting every cache into num_splits chunks multiplies the blocks; a second,
// tiny kernel merges the per-chunk partial softmaxes by log-sum-exp.
//
// Kernel 1, decode_split_kernel<T, D, GROUP>: grid (num_splits, Hkv * group_tiles, B), 128 threads.
//   One block = one chunk of one sequence for one kv head and up to GROUP (<= 8) of its query heads, so a
//   grouped-query K/V tile is read from memory once for the whole group (GQA 8:1 reads 1/8 of what
//   per-query-head blocks would). Per key tile (kKvTileBytes of K and as much of V, 32 positions at
//   bf16 D=128), with a two-stage cp.async pipeline (16-byte copies, zero-filled past the chunk end) so the
//   next tile's loads are in flight while this one is computed:
//     1. scores: x[g][j] = (scale*log2e * q_g) . k_j, one (head, key) pair per thread (or split over a
//        few lanes and shuffle-summed when the tile has fewer pairs than threads), K read from shared
//        memory rows padded by 16 bytes (conflict-free when lanes read different rows), q broadcast;
//     2. online softmax per head (one warp per head): tile max, running max m, rescale 2^(m_old - m_new),
//        p = 2^(x - m_new) written over the scores, running sum l;
//     3. acc[g][:] = acc * rescale + sum_j p[g][j] v_j, each thread owning 16 bytes' worth of one head's
//        output columns (more threads than columns: the keys are dealt over thread groups, summed once
//        at the end through shared memory).
//   fp32 throughout; exp2 with log2(e) folded into q. CUDA cores rather than tensor cores: at GROUP <= 8
//   a decode step does 2*GROUP FLOPs per byte of bf16 KV, under an H100/H200's fp32 FMA rate at full
//   HBM bandwidth, and plain FMAs keep the kernel simple and bit-for-bit independent of the MMA layout.
//   num_splits = 1: the block normalises and writes the output itself; no workspace, no second kernel.
// Kernel 2, decode_combine_kernel<T>: one block per (sequence, query head) merges the num_splits partials
//   (m_s, l_s, acc_s) from the fp32 workspace: M = max m_s, w_s = 2^(m_s - M), out = sum w_s acc_s /
//   sum w_s l_s, zeros when the sequence is empty.
//
// Limits: head_dim 32/64/128/256; k_cache and v_cache rows 16-byte aligned (refused otherwise); B and
// Hkv * group_tiles <= 65535 (grid y/z); cache_seqlens clamped into [0, S_max] (no host sync to check).
// Shared memory <= 46 KB per block (static; checked at compile time), so no opt-in attribute is needed
// and 4 blocks fit on an H100/H200 SM. Every CUDA call is checked and its error returned as a Status.
#include "llmsys/decode_attention.h"
#include "llmsys/cuda_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace llmsys {
namespace {

constexpr int kThreads = 128;            // 4 warps per split block
constexpr int kWarps = kThreads / 32;
constexpr int kKvTileBytes = 8192;       // bytes of K (and of V) per pipeline stage: 32 positions at bf16 D=128
constexpr int kStages = 2;               // double buffering: load tile t+1 while computing tile t
constexpr int kCombineThreads = 64;      // 4 output columns each: D <= 256
constexpr float kLog2e = 1.4426950408889634f;

// ---- element conversions and 16-byte vectors ---------------------------------------------------------

using cuda::from_f;  // fp16/bf16 <-> fp32 element conversions shared by every kernel
using cuda::to_f;

// 16 bytes of T (from shared memory, 16-byte aligned) widened to fp32.
template <typename T>
__device__ __forceinline__ void load_vec_f32(const T* src, float (&dst)[16 / sizeof(T)]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 16 / static_cast<int>(sizeof(T)); ++i) dst[i] = to_f(elems[i]);
}

// Asynchronous 16-byte global -> shared copy (sm_80+), zero-filling when !valid (src is not read then,
// but must still be a mapped address). Older GPUs get a synchronous copy with the same effect.
__device__ __forceinline__ void cp_async_16(void* dst_smem, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(dst_smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
#else
  *reinterpret_cast<uint4*>(dst_smem) = valid ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// ---- kernel 1: one chunk of one sequence for one kv head and up to GROUP query heads -----------------

struct SplitArgs {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  const int32_t* cache_seqlens;
  void* out;          // written when num_splits == 1
  float* part_acc;    // (B, Hq, num_splits, D) when num_splits > 1
  float* part_m;      // (B, Hq, num_splits)
  float* part_l;      // (B, Hq, num_splits)
  DecodeAttentionShape shape;
  float scale_log2;   // softmax_scale * log2(e)
  int num_splits;
  int group;          // Hq / Hkv
  int group_tiles;    // ceil(group / GROUP)
};

template <typename T, int D, int GROUP>
struct SplitConfig {
  static constexpr int VEC = 16 / static_cast<int>(sizeof(T));    // elements per 16-byte vector
  static constexpr int CHUNKS = D / VEC;                            // 16-byte vectors per row
  static constexpr int TILE = kKvTileBytes / (D * static_cast<int>(sizeof(T)));  // cache positions per tile
  static constexpr int ROW = D + VEC;                               // shared-memory row, padded 16 bytes
  // Phase 1: GROUP * TILE (head, key) dot products; SUB lanes share one when there are fewer than threads.
  static constexpr int SCORE_PAIRS = GROUP * TILE;
  static constexpr int SUB = SCORE_PAIRS >= kThreads ? 1 : kThreads / SCORE_PAIRS;
  // Phase 3: GROUP * CHUNKS (head, column vector) outputs; KEY_PARTS thread groups split the keys when
  // there are fewer outputs than threads, PAIRS outputs per thread when there are more.
  static constexpr int OUT_PAIRS = GROUP * CHUNKS;
  static constexpr int KEY_PARTS = OUT_PAIRS >= kThreads ? 1 : kThreads / OUT_PAIRS;
  static constexpr int PAIRS = OUT_PAIRS >= kThreads ? OUT_PAIRS / kThreads : 1;

  static_assert(D % VEC == 0 && TILE >= 8 && TILE <= 128, "tile shape");
  static_assert(SUB <= CHUNKS && (SCORE_PAIRS * SUB) % kThreads == 0, "phase 1 must give every lane equal work");
  static_assert(OUT_PAIRS * KEY_PARTS == kThreads * PAIRS && TILE % KEY_PARTS == 0, "phase 3 thread mapping");
};

template <typename T, int D, int GROUP>
struct SplitSmem {
  using C = SplitConfig<T, D, GROUP>;
  T kv[kStages][2][C::TILE][C::ROW];  // [stage][K or V][position][column]
  float q[GROUP][D];                  // q * scale * log2(e), zero for padding heads
  float p[GROUP][C::TILE];            // scores, then probabilities
  float rescale[GROUP];               // 2^(m_old - m_new) of the current tile
  float m[GROUP];                     // running max (log2 domain)
  float l[GROUP];                     // running sum
};

template <typename T, int D, int GROUP>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const SplitArgs args) {
  using C = SplitConfig<T, D, GROUP>;
  using Smem = SplitSmem<T, D, GROUP>;
  constexpr int VEC = C::VEC, CHUNKS = C::CHUNKS, TILE = C::TILE;
  static_assert(sizeof(Smem) <= 48 * 1024, "static shared memory is limited to 48 KB");
  static_assert(C::KEY_PARTS * C::OUT_PAIRS * VEC * sizeof(float) <= sizeof(Smem::kv), "reduction buffer");
  __shared__ __align__(16) unsigned char smem_raw[sizeof(Smem)];
  Smem& s = *reinterpret_cast<Smem*>(smem_raw);

  const DecodeAttentionShape& sh = args.shape;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int split = blockIdx.x;
  const int kv_head = blockIdx.y / args.group_tiles, group_tile = blockIdx.y % args.group_tiles;
  const int64_t b = blockIdx.z;
  const int head0 = kv_head * args.group + group_tile * GROUP;      // first query head of this block
  const int heads = min(GROUP, args.group - group_tile * GROUP);    // real heads in this block

  // This block's chunk of the cache (see decode_attention_chunk_len in the header).
  int64_t L = args.cache_seqlens[b];
  L = L < 0 ? 0 : (L > sh.S_max ? sh.S_max : L);
  const int64_t chunk = decode_attention_chunk_len(L, args.num_splits, TILE);
  const int64_t start = split * chunk;
  const int64_t end = start + chunk < L ? start + chunk : L;
  const int num_tiles = end > start ? static_cast<int>((end - start + TILE - 1) / TILE) : 0;

  const T* q = static_cast<const T*>(args.q) + b * sh.stride_qb;
  const T* k_seq = static_cast<const T*>(args.k_cache) + b * sh.stride_kb + kv_head * sh.stride_kh;
  const T* v_seq = static_cast<const T*>(args.v_cache) + b * sh.stride_vb + kv_head * sh.stride_vh;

  // Issue the copies of tile t into stage `stage`: K and V rows, 16 bytes per copy, zero past `end`.
  auto load_tile = [&](int t, int stage) {
    const int64_t pos0 = start + static_cast<int64_t>(t) * TILE;
    for (int i = tid; i < TILE * CHUNKS; i += kThreads) {
      const int row = i / CHUNKS, col = (i % CHUNKS) * VEC;
      const bool valid = pos0 + row < end;
      const int64_t pos = valid ? pos0 + row : 0;
      cp_async_16(&s.kv[stage][0][row][col], k_seq + pos * sh.stride_ks + col, valid);
      cp_async_16(&s.kv[stage][1][row][col], v_seq + pos * sh.stride_vs + col, valid);
    }
    cp_async_commit();
  };

  if (num_tiles > 0) load_tile(0, 0);  // in flight while q is staged

  for (int i = tid; i < GROUP * D; i += kThreads) {
    const int g = i / D, d = i % D;
    s.q[g][d] = g < heads ? to_f(q[(head0 + g) * sh.stride_qh + d]) * args.scale_log2 : 0.f;
  }
  if (tid < GROUP) {
    s.m[tid] = -INFINITY;
    s.l[tid] = 0.f;
  }

  // Phase-3 ownership: output vector `pair` (head g, columns col..col+VEC) over keys key_part + k*KEY_PARTS.
  const int key_part = tid / C::OUT_PAIRS;  // 0 when KEY_PARTS == 1
  float acc[C::PAIRS][VEC];
#pragma unroll
  for (int i = 0; i < C::PAIRS; ++i) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[i][e] = 0.f;
  }

  for (int t = 0; t < num_tiles; ++t) {
    const int stage = t % kStages;
    if (t + 1 < num_tiles) {
      load_tile(t + 1, (t + 1) % kStages);
      cp_async_wait<1>();  // tile t has landed; t + 1 may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int64_t tile_start = start + static_cast<int64_t>(t) * TILE;
    const int valid = end - tile_start < TILE ? static_cast<int>(end - tile_start) : TILE;  // real positions

    // 1. scores: SUB adjacent lanes share one (head, key) pair, each taking every SUB-th column vector.
    for (int pr = tid / C::SUB; pr < C::SCORE_PAIRS; pr += kThreads / C::SUB) {
      const int g = pr / TILE, key = pr % TILE, sub = tid % C::SUB;
      const T* krow = &s.kv[stage][0][key][0];
      const float* qrow = &s.q[g][0];
      float part[4] = {0.f, 0.f, 0.f, 0.f};  // four chains for instruction-level parallelism
#pragma unroll
      for (int c = sub; c < CHUNKS; c += C::SUB) {
        float kf[VEC];
        load_vec_f32(krow + c * VEC, kf);
#pragma unroll
        for (int e = 0; e < VEC; e += 4) {
          const float4 qv = *reinterpret_cast<const float4*>(qrow + c * VEC + e);
          part[0] = fmaf(qv.x, kf[e], part[0]);
          part[1] = fmaf(qv.y, kf[e + 1], part[1]);
          part[2] = fmaf(qv.z, kf[e + 2], part[2]);
          part[3] = fmaf(qv.w, kf[e + 3], part[3]);
        }
      }
      float x = (part[0] + part[1]) + (part[2] + part[3]);
#pragma unroll
      for (int off = C::SUB / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
      if (sub == 0) s.p[g][key] = key < valid ? x : -INFINITY;
    }
    __syncthreads();

    // 2. online softmax, one warp per head.
    for (int g = warp; g < GROUP; g += kWarps) {
      float tile_max = -INFINITY;
      for (int key = lane; key < TILE; key += 32) tile_max = fmaxf(tile_max, s.p[g][key]);
      tile_max = warp_max(tile_max);
      const float m_old = s.m[g];
      const float m_new = fmaxf(m_old, tile_max);
      const float m_ref = m_new == -INFINITY ? 0.f : m_new;  // all -inf (only with inf inputs): no NaN
      float sum = 0.f;
      for (int key = lane; key < TILE; key += 32) {
        const float pk = exp2f(s.p[g][key] - m_ref);
        s.p[g][key] = pk;
        sum += pk;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float r = exp2f(m_old - m_ref);
        s.rescale[g] = r;
        s.l[g] = s.l[g] * r + sum;
        s.m[g] = m_new;
      }
    }
    __syncthreads();

    // 3. acc = acc * rescale + P V. Padding positions have p = 0 and zero-filled V rows.
#pragma unroll
    for (int i = 0; i < C::PAIRS; ++i) {
      const int pair = (tid + i * kThreads) % C::OUT_PAIRS;
      const int g = pair / CHUNKS, col = (pair % CHUNKS) * VEC;
      const float r = s.rescale[g];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[i][e] *= r;
#pragma unroll 4
      for (int key = key_part; key < TILE; key += C::KEY_PARTS) {
        const float pk = s.p[g][key];
        float vf[VEC];
        load_vec_f32(&s.kv[stage][1][key][col], vf);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[i][e] = fmaf(pk, vf[e], acc[i][e]);
      }
    }
    __syncthreads();  // stage `stage` and s.p are free for the next tile
  }

  if constexpr (C::KEY_PARTS > 1) {
    // Sum the key groups through shared memory (the K/V stages are idle now: every copy has landed).
    __syncthreads();  // also orders the q / m / l initialisation when there were no tiles
    float* red = reinterpret_cast<float*>(&s.kv[0][0][0][0]);  // [KEY_PARTS][OUT_PAIRS][VEC]
    const int pair = tid % C::OUT_PAIRS;
#pragma unroll
    for (int e = 0; e < VEC; ++e) red[(key_part * C::OUT_PAIRS + pair) * VEC + e] = acc[0][e];
    __syncthreads();
    if (key_part == 0) {
      for (int kp = 1; kp < C::KEY_PARTS; ++kp) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[0][e] += red[(kp * C::OUT_PAIRS + pair) * VEC + e];
      }
    }
  } else {
    __syncthreads();  // m / l initialisation visible when there were no tiles
  }
  if (key_part != 0) return;

#pragma unroll
  for (int i = 0; i < C::PAIRS; ++i) {
    const int pair = (tid + i * kThreads) % C::OUT_PAIRS;
    const int g = pair / CHUNKS, col = (pair % CHUNKS) * VEC;
    if (g >= heads) continue;
    const int64_t h = head0 + g;
    if (args.num_splits == 1) {
      const float l = s.l[g];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      T* o = static_cast<T*>(args.out) + b * sh.stride_ob + h * sh.stride_oh + col;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o[e] = from_f<T>(acc[i][e] * inv);
    } else {
      const int64_t row = (b * sh.Hq + h) * args.num_splits + split;
      float4* dst = reinterpret_cast<float4*>(args.part_acc + row * D + col);
#pragma unroll
      for (int e = 0; e < VEC; e += 4) dst[e / 4] = make_float4(acc[i][e], acc[i][e + 1], acc[i][e + 2], acc[i][e + 3]);
      if (col == 0) {
        args.part_m[row] = s.m[g];
        args.part_l[row] = s.l[g];
      }
    }
  }
}

// ---- kernel 2: log-sum-exp merge of the splits, one block per (sequence, query head) -----------------

template <typename T>
__global__ void __launch_bounds__(kCombineThreads) decode_combine_kernel(const float* __restrict__ part_acc,
                                                                       const float* __restrict__ part_m,
                                                                       const float* __restrict__ part_l, T* out,
                                                                       DecodeAttentionShape sh, int num_splits) {
  __shared__ float weight[kDecodeMaxSplits];
  __shared__ float inv_denom;
  const int64_t row = blockIdx.x;  // b * Hq + h
  const int tid = threadIdx.x;
  if (tid < 32) {
    float M = -INFINITY;
    for (int sp = tid; sp < num_splits; sp += 32) M = fmaxf(M, part_m[row * num_splits + sp]);
    M = warp_max(M);
    float denom = 0.f;
    for (int sp = tid; sp < num_splits; sp += 32) {
      const float m = part_m[row * num_splits + sp];
      const float w = m == -INFINITY ? 0.f : exp2f(m - M);  // empty chunks weigh nothing
      weight[sp] = w;
      denom += w * part_l[row * num_splits + sp];
    }
    denom = warp_sum(denom);
    if (tid == 0) inv_denom = denom > 0.f ? 1.f / denom : 0.f;  // empty sequence: zeros
  }
  __syncthreads();
  const int col = tid * 4;
  if (col >= sh.D) return;
  float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int sp = 0; sp < num_splits; ++sp) {
    const float w = weight[sp];
    if (w == 0.f) continue;
    const float4 a = *reinterpret_cast<const float4*>(part_acc + (row * num_splits + sp) * sh.D + col);
    o.x = fmaf(w, a.x, o.x);
    o.y = fmaf(w, a.y, o.y);
    o.z = fmaf(w, a.z, o.z);
    o.w = fmaf(w, a.w, o.w);
  }
  const float inv = inv_denom;
  const int64_t b = row / sh.Hq, h = row % sh.Hq;
  T* dst = out + b * sh.stride_ob + h * sh.stride_oh + col;
  dst[0] = from_f<T>(o.x * inv);
  dst[1] = from_f<T>(o.y * inv);
  dst[2] = from_f<T>(o.z * inv);
  dst[3] = from_f<T>(o.w * inv);
}

// ---- launchers -----------------------------------------------------------------------------------------

int group_tile_for(int64_t group) {
  int tile = 1;
  while (tile < group && tile < kDecodeMaxGroupTile) tile *= 2;
  return tile;
}

Status check_shape(DType dtype, const DecodeAttentionShape& s) {
  if (dtype != DType::kFloat32 && dtype != DType::kFloat16 && dtype != DType::kBFloat16) {
    return "decode_attention: dtype must be float32, float16 or bfloat16";
  }
  if (s.B < 0 || s.Hq <= 0 || s.Hkv <= 0 || s.S_max < 0) return "decode_attention: negative or empty sizes";
  if (s.Hq % s.Hkv != 0) return "decode_attention: the number of kv heads must divide the number of query heads";
  if (!decode_attention_head_dim_supported(s.D)) return "decode_attention: head_dim must be 32, 64, 128 or 256";
  const int64_t group = s.Hq / s.Hkv;
  const int64_t tiles = (group + kDecodeMaxGroupTile - 1) / kDecodeMaxGroupTile;
  if (s.B > 65535 || s.Hkv * tiles > 65535) {
    return "decode_attention: the CUDA kernel supports at most 65535 sequences and 65535 * 8 query heads";
  }
  return kOk;
}

template <typename T, int D, int GROUP>
Status launch_split(const SplitArgs& args, cudaStream_t stream) {
  const dim3 grid(args.num_splits, static_cast<unsigned>(args.shape.Hkv * args.group_tiles),
                  static_cast<unsigned>(args.shape.B));
  decode_split_kernel<T, D, GROUP><<<grid, kThreads, 0, stream>>>(args);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? kOk : cudaGetErrorString(err);
}

template <typename T, int D>
Status launch_split_group(const SplitArgs& args, int group_tile, cudaStream_t stream) {
  switch (group_tile) {
    case 1: return launch_split<T, D, 1>(args, stream);
    case 2: return launch_split<T, D, 2>(args, stream);
    case 4: return launch_split<T, D, 4>(args, stream);
    case 8: return launch_split<T, D, 8>(args, stream);
  }
  return "decode_attention: internal error (group tile)";
}

template <typename T>
Status launch_typed(const SplitArgs& args, int group_tile, cudaStream_t stream) {
  Status status = kOk;
  switch (args.shape.D) {
    case 32: status = launch_split_group<T, 32>(args, group_tile, stream); break;
    case 64: status = launch_split_group<T, 64>(args, group_tile, stream); break;
    case 128: status = launch_split_group<T, 128>(args, group_tile, stream); break;
    case 256: status = launch_split_group<T, 256>(args, group_tile, stream); break;
    default: return "decode_attention: head_dim must be 32, 64, 128 or 256";
  }
  if (status != kOk || args.num_splits == 1) return status;
  const unsigned rows = static_cast<unsigned>(args.shape.B * args.shape.Hq);
  decode_combine_kernel<T><<<rows, kCombineThreads, 0, stream>>>(args.part_acc, args.part_m, args.part_l,
                                                                 static_cast<T*>(args.out), args.shape,
                                                                 args.num_splits);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? kOk : cudaGetErrorString(err);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

Status decode_attention_cuda_plan(DType dtype, const DecodeAttentionShape& shape, int num_splits_requested,
                                  int* num_splits, int64_t* workspace_floats) {
  if (Status err = check_shape(dtype, shape)) return err;
  if (num_splits_requested < 0 || num_splits_requested > kDecodeMaxSplits) {
    return "decode_attention: num_splits must be in [0, 128] (0: choose)";
  }
  int splits = num_splits_requested;
  if (splits == 0) {
    int device = 0, sm_count = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return cudaGetErrorString(err);
    const int64_t group = shape.Hq / shape.Hkv;
    const int64_t group_tiles = (group + kDecodeMaxGroupTile - 1) / kDecodeMaxGroupTile;
    splits = decode_attention_num_splits_heuristic(shape.B, shape.Hkv, group_tiles, shape.S_max, sm_count);
  }
  *num_splits = splits;
  // (acc: D floats, m, l) per (sequence, query head, split).
  *workspace_floats = splits > 1 ? shape.B * shape.Hq * splits * (shape.D + 2) : 0;
  return kOk;
}

Status decode_attention_cuda(DType dtype, const void* q, const void* k_cache, const void* v_cache,
                             const int32_t* cache_seqlens, void* out, const DecodeAttentionShape& shape,
                             float softmax_scale, int num_splits, float* workspace, cudaStream_t stream) {
  if (Status err = check_shape(dtype, shape)) return err;
  if (num_splits < 1 || num_splits > kDecodeMaxSplits) return "decode_attention: num_splits must be in [1, 128]";
  if (num_splits > 1 && workspace == nullptr) return "decode_attention: num_splits > 1 needs the workspace";
  if (shape.B == 0) return kOk;
  const int64_t vec = 16 / dtype_size(dtype);
  const bool rows_aligned = aligned16(k_cache) && aligned16(v_cache) && shape.stride_kb % vec == 0 &&
                            shape.stride_ks % vec == 0 && shape.stride_kh % vec == 0 && shape.stride_vb % vec == 0 &&
                            shape.stride_vs % vec == 0 && shape.stride_vh % vec == 0;
  if (!rows_aligned) {
    return "decode_attention: the CUDA kernel needs 16-byte aligned k_cache / v_cache rows (data pointers and "
           "the strides over B, S and H multiples of 16 bytes); pass a cache allocated by PyTorch, or .contiguous()";
  }
  const int64_t group = shape.Hq / shape.Hkv;
  const int group_tile = group_tile_for(group);

  SplitArgs args{};
  args.q = q, args.k_cache = k_cache, args.v_cache = v_cache, args.cache_seqlens = cache_seqlens, args.out = out;
  const int64_t rows = shape.B * shape.Hq * num_splits;
  args.part_acc = num_splits > 1 ? workspace : nullptr;
  args.part_m = num_splits > 1 ? workspace + rows * shape.D : nullptr;
  args.part_l = num_splits > 1 ? workspace + rows * (shape.D + 1) : nullptr;
  args.shape = shape;
  args.scale_log2 = softmax_scale * kLog2e;
  args.num_splits = num_splits;
  args.group = static_cast<int>(group);
  args.group_tiles = static_cast<int>((group + group_tile - 1) / group_tile);

  switch (dtype) {
    case DType::kFloat32: return launch_typed<float>(args, group_tile, stream);
    case DType::kFloat16: return launch_typed<__half>(args, group_tile, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(args, group_tile, stream);
  }
  return "decode_attention: dtype must be float32, float16 or bfloat16";
}

}  // namespace llmsys
