// bind_swiglu.cpp: torch.ops.llmsys.swiglu_fwd / swiglu_bwd over the CPU twin and the CUDA kernel (math
// in csrc/include/llmsys/swiglu.h). Inputs of any shape; non-contiguous ones are copied first. The
// autograd Function is in llmsys/kernels/swiglu.py.
#include <torch/library.h>

#include "llmsys/bind_utils.h"
#include "llmsys/swiglu.h"

namespace llmsys {
namespace {

constexpr const char* kFwd = "llmsys::swiglu_fwd";
constexpr const char* kBwd = "llmsys::swiglu_bwd";

DType check_pair(const at::Tensor& a, const at::Tensor& b, const char* op, const char* what) {
  check_same_device(a, b, op, what);
  TORCH_CHECK_VALUE(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(), op, ": ", what,
                    " must have gate's shape and dtype");
  return dtype_of(a, op, "gate");
}

at::Tensor swiglu_fwd(const at::Tensor& gate_in, const at::Tensor& up_in) {
  const DType dtype = check_pair(gate_in, up_in, kFwd, "up");
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor out = at::empty_like(gate);
  const int64_t n = gate.numel();
  if (n == 0) return out;
  if (gate.is_cpu()) {
    check_status(swiglu_forward_cpu(dtype, gate.data_ptr(), up.data_ptr(), out.data_ptr(), n), kFwd);
  } else {
#ifdef LLMSYS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(gate.device());
    check_status(swiglu_forward_cuda(dtype, gate.data_ptr(), up.data_ptr(), out.data_ptr(), n, stream_for(gate)), kFwd);
#else
    TORCH_CHECK(false, kFwd, ": built without CUDA");
#endif
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dout_in, const at::Tensor& gate_in,
                                              const at::Tensor& up_in) {
  const DType dtype = check_pair(gate_in, up_in, kBwd, "up");
  check_pair(gate_in, dout_in, kBwd, "dout");
  const at::Tensor dout = dout_in.contiguous(), gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor dgate = at::empty_like(gate), dup = at::empty_like(up);
  const int64_t n = gate.numel();
  if (n == 0) return {dgate, dup};
  if (gate.is_cpu()) {
    check_status(swiglu_backward_cpu(dtype, dout.data_ptr(), gate.data_ptr(), up.data_ptr(), dgate.data_ptr(),
                                     dup.data_ptr(), n),
                 kBwd);
  } else {
#ifdef LLMSYS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(gate.device());
    check_status(swiglu_backward_cuda(dtype, dout.data_ptr(), gate.data_ptr(), up.data_ptr(), dgate.data_ptr(),
                                      dup.data_ptr(), n, stream_for(gate)),
                 kBwd);
#else
    TORCH_CHECK(false, kBwd, ": built without CUDA");
#endif
  }
  return {dgate, dup};
}

}  // namespace
}  // namespace llmsys

TORCH_LIBRARY_FRAGMENT(llmsys, m) {
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_bwd(Tensor dout, Tensor gate, Tensor up) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llmsys, CPU, m) {
  m.impl("swiglu_fwd", &llmsys::swiglu_fwd);
  m.impl("swiglu_bwd", &llmsys::swiglu_bwd);
}

#ifdef LLMSYS_WITH_CUDA
TORCH_LIBRARY_IMPL(llmsys, CUDA, m) {
  m.impl("swiglu_fwd", &llmsys::swiglu_fwd);
  m.impl("swiglu_bwd", &llmsys::swiglu_bwd);
}
#endif
