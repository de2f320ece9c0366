// bind_rms_norm.cpp: torch.ops.llmsys.rms_norm_fwd / rms_norm_bwd over the CPU twin and the CUDA kernel
// (math and layout in csrc/include/llmsys/rms_norm.h). The autograd Function is in
// llmsys/kernels/rms_norm.py, which also checks arguments with friendlier messages.
#include <torch/library.h>

#include "llmsys/bind_utils.h"
#include "llmsys/rms_norm.h"

namespace llmsys {
namespace {

constexpr const char* kFwd = "llmsys::rms_norm_fwd";
constexpr const char* kBwd = "llmsys::rms_norm_bwd";

DType check_weight(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  check_same_device(x, weight, op, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 1 && x.dim() >= 1 && weight.size(0) == x.size(-1), op,
                    ": weight must be 1-D of size x.shape[-1]");
  const DType dtype = dtype_of(x, op, "x");
  const DType weight_dtype = dtype_of(weight, op, "weight");
  TORCH_CHECK_VALUE(weight_dtype == dtype || weight_dtype == DType::kFloat32, op,
                    ": weight must have x's dtype or be float32");
  return weight_dtype;
}

void check_like(const at::Tensor& x, const at::Tensor& other, const char* op, const char* what) {
  check_same_device(x, other, op, what);
  TORCH_CHECK_VALUE(other.sizes() == x.sizes() && other.scalar_type() == x.scalar_type(), op, ": ", what,
                    " must have x's shape and dtype");
}

// (y, rstd, residual_out); residual_out has zero elements when no residual is given.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                            double eps,
                                                            const c10::optional<at::Tensor>& residual_in) {
  const DType weight_dtype = check_weight(x_in, weight_in, kFwd);
  const DType dtype = dtype_of(x_in, kFwd, "x");
  TORCH_CHECK_VALUE(eps >= 0, kFwd, ": eps must be >= 0");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor residual, residual_out = at::empty({0}, x.options());
  if (residual_in.has_value()) {
    check_like(x, *residual_in, kFwd, "residual");
    residual = residual_in->contiguous();
    residual_out = at::empty_like(x);
  }
  const int64_t cols = x.size(-1);
  TORCH_CHECK_VALUE(cols >= 1, kFwd, ": the last dimension must be non-empty");
  const int64_t rows = x.numel() / cols;
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  const void* res_ptr = residual.defined() ? residual.data_ptr() : nullptr;
  void* res_out_ptr = residual.defined() ? residual_out.data_ptr() : nullptr;
  if (x.is_cpu()) {
    check_status(rms_norm_forward_cpu(dtype, weight_dtype, x.data_ptr(), res_ptr, weight.data_ptr(), y.data_ptr(),
                                      res_out_ptr, rstd.data_ptr<float>(), rows, cols, static_cast<float>(eps)),
                 kFwd);
  } else {
#ifdef LLMSYS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    check_status(rms_norm_forward_cuda(dtype, weight_dtype, x.data_ptr(), res_ptr, weight.data_ptr(), y.data_ptr(),
                                       res_out_ptr, rstd.data_ptr<float>(), rows, cols, static_cast<float>(eps),
                                       stream_for(x)),
                 kFwd);
#else
    TORCH_CHECK(false, kFwd, ": built without CUDA");
#endif
  }
  return {y, rstd, residual_out};
}

// (dh, dweight). h is what was normalised (x, or the residual_out of the forward).
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy_in, const at::Tensor& h_in,
                                                const at::Tensor& weight_in, const at::Tensor& rstd_in,
                                                const c10::optional<at::Tensor>& dresidual_in) {
  const DType weight_dtype = check_weight(h_in, weight_in, kBwd);
  const DType dtype = dtype_of(h_in, kBwd, "h");
  check_like(h_in, dy_in, kBwd, "dy");
  const at::Tensor h = h_in.contiguous(), dy = dy_in.contiguous(), weight = weight_in.contiguous();
  const int64_t cols = h.size(-1);
  TORCH_CHECK_VALUE(cols >= 1, kBwd, ": the last dimension must be non-empty");
  const int64_t rows = h.numel() / cols;
  check_same_device(h, rstd_in, kBwd, "rstd");
  TORCH_CHECK_VALUE(rstd_in.scalar_type() == at::kFloat && rstd_in.numel() == rows, kBwd,
                    ": rstd must be float32 with one value per row");
  const at::Tensor rstd = rstd_in.contiguous();
  at::Tensor dresidual;
  if (dresidual_in.has_value()) {
    check_like(h, *dresidual_in, kBwd, "dresidual");
    dresidual = dresidual_in->contiguous();
  }
  const void* dres_ptr = dresidual.defined() ? dresidual.data_ptr() : nullptr;
  at::Tensor dh = at::empty_like(h);
  at::Tensor dweight = at::empty_like(weight);
  if (h.is_cpu()) {
    check_status(rms_norm_backward_cpu(dtype, weight_dtype, dy.data_ptr(), h.data_ptr(), dres_ptr, weight.data_ptr(),
                                       rstd.data_ptr<float>(), dh.data_ptr(), dweight.data_ptr(), rows, cols),
                 kBwd);
  } else {
#ifdef LLMSYS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(h.device());
    int64_t workspace_floats = 0;
    check_status(rms_norm_backward_cuda_workspace(rows, cols, &workspace_floats), kBwd);
    at::Tensor workspace = at::empty({workspace_floats}, h.options().dtype(at::kFloat));
    check_status(rms_norm_backward_cuda(dtype, weight_dtype, dy.data_ptr(), h.data_ptr(), dres_ptr, weight.data_ptr(),
                                        rstd.data_ptr<float>(), dh.data_ptr(), dweight.data_ptr(),
                                        workspace.data_ptr<float>(), rows, cols, stream_for(h)),
                 kBwd);
#else
    TORCH_CHECK(false, kBwd, ": built without CUDA");
#endif
  }
  return {dh, dweight};
}

}  // namespace
}  // namespace llmsys

TORCH_LIBRARY_FRAGMENT(llmsys, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps, Tensor? residual=None) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor h, Tensor weight, Tensor rstd, Tensor? dresidual=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llmsys, CPU, m) {
  m.impl("rms_norm_fwd", &llmsys::rms_norm_fwd);
  m.impl("rms_norm_bwd", &llmsys::rms_norm_bwd);
}

#ifdef LLMSYS_WITH_CUDA
TORCH_LIBRARY_IMPL(llmsys, CUDA, m) {
  m.impl("rms_norm_fwd", &llmsys::rms_norm_fwd);
  m.impl("rms_norm_bwd", &llmsys::rms_norm_bwd);
}
#endif
