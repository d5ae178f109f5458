// A plain C ABI over kernel.h, for callers that hand over raw pointers (PyTorch through
// ctypes): not tied to any framework's headers or version. A call passes its dtype, its
// Params (kernel.h; l2norm._native.Params mirrors it) by pointer, then its arrays.
//
// Built for this machine's CPU at first use (-march=native, l2norm/_native), or at install
// once per x86-64 level (hatch_build.py), the loader taking the best level the CPU runs.
#include "kernel.h"

namespace {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Calls kernel(E{}) with E the element type of `dtype`; -1 for a dtype or parameters the
// kernel does not take, else 0.
template <typename Kernel>
int dispatch(int dtype, const l2norm::Params* params, Kernel kernel) {
  if (params == nullptr || !l2norm::valid(*params)) return -1;
  switch (dtype) {
    case kFloat32:
      kernel(l2norm::Float32{});
      return 0;
    case kFloat16:
      kernel(l2norm::Float16{});
      return 0;
    case kBFloat16:
      kernel(l2norm::BFloat16{});
      return 0;
  }
  return -1;
}

}  // namespace

extern "C" {

// The version of this interface (kernel.h's kAbiVersion): the Python side refuses a
// library of another version.
int l2norm_abi_version(void) { return l2norm::kAbiVersion; }

// sizeof(Params), which the Python side checks against its mirror of the struct.
int64_t l2norm_params_size(void) { return sizeof(l2norm::Params); }

// y = w * x / d(||x||) over the middle axis of params->shape; returns 0, or -1 for
// arguments it does not take.
int l2norm_forward(int dtype, const l2norm::Params* params, const void* x, const double* w,
                   void* y) {
  return dispatch(dtype, params, [&](auto e) {
    using E = decltype(e);
    using T = typename E::T;
    l2norm::forward<E>(*params, static_cast<const T*>(x), w, static_cast<T*>(y));
  });
}

// dx and dw (C doubles: the scale's gradient per channel) for the cotangent g.
int l2norm_backward(int dtype, const l2norm::Params* params, const void* x, const void* g,
                    const double* w, void* dx, double* dw) {
  return dispatch(dtype, params, [&](auto e) {
    using E = decltype(e);
    using T = typename E::T;
    l2norm::backward<E>(*params, static_cast<const T*>(x), static_cast<const T*>(g), w,
                        static_cast<T*>(dx), dw);
  });
}

}  // extern "C"
