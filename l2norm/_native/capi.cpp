// A plain C ABI over kernel.h, for callers that hand over raw pointers (PyTorch through
// ctypes): not tied to any framework's headers or version.
//
// Built for this machine's CPU at first use (-march=native, l2norm/_native), or at install
// once per x86-64 level (hatch_build.py), the loader taking the best level the CPU runs.
#include "kernel.h"

namespace {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

bool valid(int64_t outer, int64_t C, int64_t inner, int64_t w_len, int power, int threads) {
  // Zero sizes are valid: the kernel returns at once (and zeroes dw).
  return outer >= 0 && C >= 0 && inner >= 0 && (w_len == 0 || w_len == 1 || w_len == C) &&
         (power == 1 || power == 2) && threads > 0;
}

}  // namespace

extern "C" {

// The version of this interface: the Python side refuses a library of another version.
int l2norm_abi_version(void) { return 1; }

// y = w * x / d(||x||) over the middle axis of (outer, C, inner); returns 0, or -1 for
// arguments it does not take.
int l2norm_forward(int dtype, const void* x, void* y, int64_t outer, int64_t C, int64_t inner,
                   const double* w, int64_t w_len, int is_add, int power, double eps,
                   int threads) {
  if (!valid(outer, C, inner, w_len, power, threads)) return -1;
  const l2norm::Shape s{outer, C, inner};
  const l2norm::Placement pl{is_add != 0, power, eps};
  switch (dtype) {
    case kFloat32:
      l2norm::forward<l2norm::Float32>(static_cast<const float*>(x), static_cast<float*>(y), s,
                                       w, w_len, pl, threads);
      return 0;
    case kFloat16:
      l2norm::forward<l2norm::Float16>(static_cast<const uint16_t*>(x),
                                       static_cast<uint16_t*>(y), s, w, w_len, pl, threads);
      return 0;
    case kBFloat16:
      l2norm::forward<l2norm::BFloat16>(static_cast<const uint16_t*>(x),
                                        static_cast<uint16_t*>(y), s, w, w_len, pl, threads);
      return 0;
  }
  return -1;
}

// dx and dw (C doubles: the scale's gradient per channel) for the cotangent g.
int l2norm_backward(int dtype, const void* x, const void* g, void* dx, double* dw,
                    int64_t outer, int64_t C, int64_t inner, const double* w, int64_t w_len,
                    int is_add, int power, double eps, int threads) {
  if (!valid(outer, C, inner, w_len, power, threads)) return -1;
  const l2norm::Shape s{outer, C, inner};
  const l2norm::Placement pl{is_add != 0, power, eps};
  switch (dtype) {
    case kFloat32:
      l2norm::backward<l2norm::Float32>(static_cast<const float*>(x),
                                        static_cast<const float*>(g), static_cast<float*>(dx),
                                        dw, s, w, w_len, pl, threads);
      return 0;
    case kFloat16:
      l2norm::backward<l2norm::Float16>(static_cast<const uint16_t*>(x),
                                        static_cast<const uint16_t*>(g),
                                        static_cast<uint16_t*>(dx), dw, s, w, w_len, pl, threads);
      return 0;
    case kBFloat16:
      l2norm::backward<l2norm::BFloat16>(static_cast<const uint16_t*>(x),
                                         static_cast<const uint16_t*>(g),
                                         static_cast<uint16_t*>(dx), dw, s, w, w_len, pl,
                                         threads);
      return 0;
  }
  return -1;
}

}  // extern "C"
