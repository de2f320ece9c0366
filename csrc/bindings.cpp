// bindings.cpp: the Python module `llmsys_C` (JIT) / `llmsys._C` (pre-built) that carries the ops.
//
// The ops themselves are registered by each csrc/bind_<op>.cpp with TORCH_LIBRARY_FRAGMENT(llmsys, ...)
// from static initialisers, so they exist as torch.ops.llmsys.* as soon as this shared library is
// loaded; this file only gives torch.utils.cpp_extension a module to import and knows no op names.
// pybind11 alone (not torch/extension.h) keeps this translation unit cheap to compile.
#include <pybind11/pybind11.h>

#ifndef TORCH_EXTENSION_NAME
#error "TORCH_EXTENSION_NAME must be defined (torch.utils.cpp_extension does so)"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llmsys custom C++/CUDA ops. Importing this module registers them as torch.ops.llmsys.*; "
            "call them through llmsys.kernels (rms_norm, apply_rotary, swiglu, ...), which build and load "
            "it with llmsys.kernels._ext.load_extension().";
#ifdef LLMSYS_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
