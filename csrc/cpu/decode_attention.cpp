// CPU twin of csrc/cuda/decode_attention.cu (see llmsys/decode_attention.h): OpenMP over (batch, query
// head); each split's partial (m, l, acc) in the base-2 log domain, then the log-sum-exp combine, the
// same arithmetic as the GPU's combine kernel, so tests that force num_splits > 1 here check it.
#include "llmsys/decode_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace llmsys {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

// Checks shared by every dtype; the messages are literals (Status has static storage).
Status check(const DecodeAttentionShape& s, const int32_t* cache_seqlens, int num_splits) {
  if (s.B < 0 || s.Hq <= 0 || s.Hkv <= 0 || s.S_max < 0) return "decode_attention: negative or empty sizes";
  if (s.Hq % s.Hkv != 0) return "decode_attention: the number of kv heads must divide the number of query heads";
  if (!decode_attention_head_dim_supported(s.D)) {
    return "decode_attention: head_dim must be 32, 64, 128 or 256";
  }
  if (num_splits < 0 || num_splits > kDecodeMaxSplits) return "decode_attention: num_splits must be in [0, 128]";
  for (int64_t b = 0; b < s.B; ++b) {
    if (cache_seqlens[b] < 0 || cache_seqlens[b] > s.S_max) {
      return "decode_attention: cache_seqlens must lie in [0, S_max] (the cache's second dimension)";
    }
  }
  return kOk;
}

template <typename T>
void run(const T* q, const T* k_cache, const T* v_cache, const int32_t* cache_seqlens, T* out,
         const DecodeAttentionShape& s, float softmax_scale, int num_splits) {
  const int64_t D = s.D, group = s.Hq / s.Hkv;
  const float neg_inf = -std::numeric_limits<float>::infinity();
#pragma omp parallel
  {
    // Per-thread scratch: q (pre-scaled), one chunk's scores, every split's (m, l, acc).
    std::vector<float> qf(D), scores, m(num_splits), l(num_splits), acc(num_splits * D);
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < s.B; ++b) {
      for (int64_t h = 0; h < s.Hq; ++h) {
        const int64_t L = cache_seqlens[b], hk = h / group;
        const T* qrow = q + b * s.stride_qb + h * s.stride_qh;
        for (int64_t d = 0; d < D; ++d) qf[d] = to_float(qrow[d]) * softmax_scale * kLog2e;
        const int64_t chunk = decode_attention_chunk_len(L, num_splits, kCpuKeyTile);
        scores.resize(static_cast<size_t>(chunk > 0 ? chunk : 1));
        for (int split = 0; split < num_splits; ++split) {
          const int64_t start = split * chunk, end = std::min(start + chunk, L);
          float* a = &acc[split * D];
          std::fill(a, a + D, 0.f);
          m[split] = neg_inf;
          l[split] = 0.f;
          for (int64_t j = start; j < end; ++j) {  // scores x_j = log2(e) * scale * q . k_j
            const T* krow = k_cache + b * s.stride_kb + j * s.stride_ks + hk * s.stride_kh;
            float x = 0.f;
            for (int64_t d = 0; d < D; ++d) x += qf[d] * to_float(krow[d]);
            scores[j - start] = x;
            m[split] = std::max(m[split], x);
          }
          for (int64_t j = start; j < end; ++j) {
            const float p = std::exp2(scores[j - start] - m[split]);
            l[split] += p;
            const T* vrow = v_cache + b * s.stride_vb + j * s.stride_vs + hk * s.stride_vh;
            for (int64_t d = 0; d < D; ++d) a[d] += p * to_float(vrow[d]);
          }
        }
        // Combine: M = max m_s, w_s = 2^(m_s - M), out = sum w_s acc_s / sum w_s l_s (empty: zeros).
        float M = neg_inf;
        for (int split = 0; split < num_splits; ++split) M = std::max(M, m[split]);
        float denom = 0.f;
        for (int split = 0; split < num_splits; ++split) {
          const float w = m[split] == neg_inf ? 0.f : std::exp2(m[split] - M);
          m[split] = w;  // reuse m for the weights
          denom += w * l[split];
        }
        const float inv = denom > 0.f ? 1.f / denom : 0.f;
        T* orow = out + b * s.stride_ob + h * s.stride_oh;
        for (int64_t d = 0; d < D; ++d) {
          float o = 0.f;
          for (int split = 0; split < num_splits; ++split) o += m[split] * acc[split * D + d];
          orow[d] = from_float<T>(o * inv);
        }
      }
    }
  }
}

}  // namespace

Status decode_attention_cpu(DType dtype, const void* q, const void* k_cache, const void* v_cache,
                            const int32_t* cache_seqlens, void* out, const DecodeAttentionShape& shape,
                            float softmax_scale, int num_splits) {
  if (Status err = check(shape, cache_seqlens, num_splits)) return err;
  if (num_splits == 0) num_splits = 1;  // OpenMP over (batch, head) already fills the cores
  switch (dtype) {
    case DType::kFloat32:
      run(static_cast<const float*>(q), static_cast<const float*>(k_cache), static_cast<const float*>(v_cache),
          cache_seqlens, static_cast<float*>(out), shape, softmax_scale, num_splits);
      break;
    case DType::kFloat16:
      run(static_cast<const Half*>(q), static_cast<const Half*>(k_cache), static_cast<const Half*>(v_cache),
          cache_seqlens, static_cast<Half*>(out), shape, softmax_scale, num_splits);
      break;
    case DType::kBFloat16:
      run(static_cast<const BFloat16*>(q), static_cast<const BFloat16*>(k_cache),
          static_cast<const BFloat16*>(v_cache), cache_seqlens, static_cast<BFloat16*>(out), shape, softmax_scale,
          num_splits);
      break;
  }
  return kOk;
}

}  // namespace llmsys
