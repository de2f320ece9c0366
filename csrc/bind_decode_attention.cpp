// bind_decode_attention.cpp: torch.ops.llmsys.decode_attention over the CPU twin and the CUDA
// flash-decoding kernel (math and layout in csrc/include/llmsys/decode_attention.h). Inference only: no
// autograd. llmsys/kernels/decode_attention.py checks arguments first with friendlier messages; the
// checks here keep the op safe when called directly.
#include <cmath>

#include <torch/library.h>

#include "llmsys/bind_utils.h"
#include "llmsys/decode_attention.h"

namespace llmsys {
namespace {

constexpr const char* kOp = "llmsys::decode_attention";

// q (B, Hq, D); k_cache, v_cache (B, S_max, Hkv, D); cache_seqlens int32 (B,) on q's device.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& cache_seqlens, c10::optional<double> softmax_scale,
                            int64_t num_splits) {
  const DType dtype = dtype_of(q, kOp, "q");
  TORCH_CHECK_VALUE(q.dim() == 3, kOp, ": q must be (B, Hq, D), got ", q.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && v_cache.dim() == 4, kOp, ": k_cache and v_cache must be (B, S_max, Hkv, D)");
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), kOp, ": k_cache and v_cache must have the same shape");
  check_same_device(q, k_cache, kOp, "k_cache");
  check_same_device(q, v_cache, kOp, "v_cache");
  check_same_device(q, cache_seqlens, kOp, "cache_seqlens");
  TORCH_CHECK_VALUE(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(), kOp,
                    ": k_cache and v_cache must have q's dtype");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), S_max = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(0) == B && k_cache.size(3) == D, kOp, ": k_cache must be (B, S_max, Hkv, D) with q's B and D");
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, kOp, ": the number of kv heads must divide the number of query heads");
  TORCH_CHECK_VALUE(decode_attention_head_dim_supported(D), kOp, ": head_dim must be 32, 64, 128 or 256, got ", D);
  TORCH_CHECK_VALUE(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B,
                    kOp, ": cache_seqlens must be int32 of shape (B,)");
  TORCH_CHECK_VALUE(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1, kOp,
                    ": the last dimension of q, k_cache and v_cache must be contiguous");
  TORCH_CHECK_VALUE(num_splits >= 0 && num_splits <= kDecodeMaxSplits, kOp, ": num_splits must be in [0, ",
                    kDecodeMaxSplits, "] (0: choose)");
  const double scale = softmax_scale.has_value() ? *softmax_scale : 1.0 / std::sqrt(static_cast<double>(D));
  const at::Tensor seqlens = cache_seqlens.contiguous();
  at::Tensor out = at::empty({B, Hq, D}, q.options());

  DecodeAttentionShape shape{};
  shape.B = B, shape.Hq = Hq, shape.Hkv = Hkv, shape.D = D, shape.S_max = S_max;
  shape.stride_qb = q.stride(0), shape.stride_qh = q.stride(1);
  shape.stride_kb = k_cache.stride(0), shape.stride_ks = k_cache.stride(1), shape.stride_kh = k_cache.stride(2);
  shape.stride_vb = v_cache.stride(0), shape.stride_vs = v_cache.stride(1), shape.stride_vh = v_cache.stride(2);
  shape.stride_ob = out.stride(0), shape.stride_oh = out.stride(1);
  if (B == 0) return out;

  if (q.is_cpu()) {
    check_status(decode_attention_cpu(dtype, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                      seqlens.data_ptr<int32_t>(), out.data_ptr(), shape, static_cast<float>(scale),
                                      static_cast<int>(num_splits)),
                 kOp);
  } else {
#ifdef LLMSYS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    int splits = 0;
    int64_t workspace_floats = 0;
    check_status(decode_attention_cuda_plan(dtype, shape, static_cast<int>(num_splits), &splits, &workspace_floats),
                 kOp);
    at::Tensor workspace = at::empty({workspace_floats}, q.options().dtype(at::kFloat));
    check_status(decode_attention_cuda(dtype, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                       seqlens.data_ptr<int32_t>(), out.data_ptr(), shape, static_cast<float>(scale),
                                       splits, workspace_floats > 0 ? workspace.data_ptr<float>() : nullptr,
                                       stream_for(q)),
                 kOp);
#else
    TORCH_CHECK(false, kOp, ": built without CUDA");
#endif
  }
  return out;
}

// The split count the CUDA path picks when num_splits = 0 (the header's heuristic), for benchmarks and
// tests: a pure function of the shape and the SM count, callable on any build.
int64_t decode_attention_num_splits(int64_t B, int64_t Hq, int64_t Hkv, int64_t S_max, int64_t sm_count) {
  TORCH_CHECK_VALUE(B >= 0 && Hkv > 0 && Hq % Hkv == 0 && S_max >= 0 && sm_count > 0, kOp,
                    "_num_splits: need B >= 0, Hkv > 0 dividing Hq, S_max >= 0, sm_count > 0");
  const int64_t group = Hq / Hkv;
  const int64_t group_tiles = (group + kDecodeMaxGroupTile - 1) / kDecodeMaxGroupTile;
  return decode_attention_num_splits_heuristic(B, Hkv, group_tiles, S_max, static_cast<int>(sm_count));
}

}  // namespace
}  // namespace llmsys

TORCH_LIBRARY_FRAGMENT(llmsys, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, float? softmax_scale=None, "
        "int num_splits=0) -> Tensor");
  // No tensor arguments, hence no dispatch key: registered with its schema as a catch-all kernel.
  m.def("decode_attention_num_splits(int B, int Hq, int Hkv, int S_max, int sm_count) -> int",
        &llmsys::decode_attention_num_splits);
}

TORCH_LIBRARY_IMPL(llmsys, CPU, m) { m.impl("decode_attention", &llmsys::decode_attention); }

#ifdef LLMSYS_WITH_CUDA
TORCH_LIBRARY_IMPL(llmsys, CUDA, m) { m.impl("decode_attention", &llmsys::decode_attention); }
#endif
