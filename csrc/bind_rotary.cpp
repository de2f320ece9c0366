// bind_rotary.cpp: torch.ops.llmsys.apply_rotary (out of place) and apply_rotary_ (in place) over the
// CPU twin and the CUDA kernel (math and layout in csrc/include/llmsys/rotary.h). x may be strided over
// (B, T, H) (e.g. q/k sliced out of a fused qkv projection) as long as its last dimension is contiguous:
// no copy is made. The autograd Function is in llmsys/kernels/rotary.py.
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include "llmsys/bind_utils.h"
#include "llmsys/rotary.h"

namespace llmsys {
namespace {

constexpr const char* kOp = "llmsys::apply_rotary";

void launch(const at::Tensor& x, const at::Tensor& out, const at::Tensor& cos_in, const at::Tensor& sin_in,
            bool inverse) {
  const DType dtype = dtype_of(x, kOp, "x");
  TORCH_CHECK_VALUE(x.dim() == 4, kOp, ": x must be (B, T, H, D), got ", x.sizes());
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3);
  TORCH_CHECK_VALUE(D >= 2 && D % 2 == 0, kOp, ": head dim D must be even, got ", D);
  TORCH_CHECK_VALUE(x.stride(3) == 1, kOp, ": x's last dimension must be contiguous (stride 1)");
  for (const at::Tensor* table : {&cos_in, &sin_in}) {
    check_same_device(x, *table, kOp, "cos/sin");
    TORCH_CHECK_VALUE(table->scalar_type() == at::kFloat, kOp, ": cos and sin must be float32");
    TORCH_CHECK_VALUE(table->dim() == 2 && table->size(0) == T && table->size(1) == D / 2, kOp,
                      ": cos and sin must be (T, D/2) = (", T, ", ", D / 2, "), got ", table->sizes());
  }
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const RotaryShape shape{B, T, H, D, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
                          out.stride(2)};
  if (x.numel() == 0) return;
  if (x.is_cpu()) {
    check_status(apply_rotary_cpu(dtype, x.data_ptr(), out.data_ptr(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                                  shape, inverse),
                 kOp);
  } else {
#ifdef LLMSYS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    check_status(apply_rotary_cuda(dtype, x.data_ptr(), out.data_ptr(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                                   shape, inverse, stream_for(x)),
                 kOp);
#else
    TORCH_CHECK(false, kOp, ": built without CUDA");
#endif
  }
}

at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  launch(x, out, cos, sin, inverse);
  return out;
}

at::Tensor& apply_rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(x) != at::MemOverlap::Yes, kOp,
                    ": in place needs x without overlapping elements (e.g. not an expand()ed tensor)");
  launch(x, x, cos, sin, inverse);
  return x;
}

}  // namespace
}  // namespace llmsys

TORCH_LIBRARY_FRAGMENT(llmsys, m) {
  m.def("apply_rotary(Tensor x, Tensor cos, Tensor sin, bool inverse=False) -> Tensor");
  m.def("apply_rotary_(Tensor(a!) x, Tensor cos, Tensor sin, bool inverse=False) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(llmsys, CPU, m) {
  m.impl("apply_rotary", &llmsys::apply_rotary);
  m.impl("apply_rotary_", &llmsys::apply_rotary_);
}

#ifdef LLMSYS_WITH_CUDA
TORCH_LIBRARY_IMPL(llmsys, CUDA, m) {
  m.impl("apply_rotary", &llmsys::apply_rotary);
  m.impl("apply_rotary_", &llmsys::apply_rotary_);
}
#endif
