// The optional native CPU kernel of l2norm.torch (built on demand by
// l2norm.torch.use_cpu_kernel(); see docs/torch.md).
//
// The input is viewed as (outer, C, inner), contiguous, normalized over C: NCHW with
// outer = N and inner = H * W, or rows (inner = 1) for channels-last memory. Each block
// of `kBlock` neighbouring slices (pixels), or each row, is read twice while it sits in
// the core's cache, so a forward reads x from memory once
// and writes y once, and a backward reads x and g once and writes dx once; the aten
// fast path makes about three times as many passes.
//
// Sums are accumulated in double: a float's square is exact in double and cannot
// overflow or underflow there, so every finite float32 / float16 / bfloat16 slice gets
// its exact-to-1e-13 norm with no pre-scaling, and each output is rounded once. Slices
// holding NaN or Inf get inv_d = c = 0 here; the Python side finds them by that mark and
// recomputes them with the branch-free safe path (as it does for the aten fast path).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kBlock = 512;  // slices per block: x and g blocks stay in L2 (C = 512)

enum Mode : int64_t { kClampNorm = 0, kClampSumsq = 1, kAddNorm = 2, kAddSumsq = 3 };

// 1 / d(n) and c = r d / n^2 (so that dx = (sigma - c <sigma, x / d> x) / d), as
// l2norm.torch._ordinary_stats and _ordinary_c define them, from the slice's sum of
// squares; both 0 for a slice holding NaN or Inf (left to the safe path).
inline void slice_factors(double n2, int64_t mode, double eps, double thr, double* inv_d,
                          double* c) {
  if (!std::isfinite(n2)) {
    *inv_d = 0.0;
    *c = 0.0;
    return;
  }
  if (mode == kAddSumsq) {
    *inv_d = 1.0 / std::sqrt(n2 + eps);
    *c = *inv_d;
    return;
  }
  const double n = std::sqrt(n2);
  if (mode == kAddNorm) {
    *inv_d = 1.0 / (n + eps);
    *c = n > 0 ? 1.0 / n : 0.0;
    return;
  }
  // Both clamp modes: d = max(n, thr), thr = eps or sqrt(eps).
  *inv_d = 1.0 / std::max(n, thr);
  *c = n >= thr ? *inv_d : 0.0;
}

// dw[ch] = the sum over threads of their partial sums (threads x C, row-major).
inline void sum_partials(const std::vector<double>& partial, int threads, int64_t C,
                         at::Tensor& dw) {
  double* dwp = dw.data_ptr<double>();
  for (int64_t ch = 0; ch < C; ++ch) {
    double total = 0.0;
    for (int t = 0; t < threads; ++t) total += partial[static_cast<size_t>(t) * C + ch];
    dwp[ch] = total;
  }
}

struct Block {
  int64_t outer, start, len;
};

inline Block block_of(int64_t id, int64_t inner) {
  const int64_t per_row = (inner + kBlock - 1) / kBlock;
  const int64_t outer = id / per_row;
  const int64_t start = (id % per_row) * kBlock;
  return {outer, start, std::min(kBlock, inner - start)};
}

// Independent partial sums in the row loops: reductions the compiler vectorizes without
// reordering any one sum (so no -ffast-math).
constexpr int64_t kLanes = 8;

// Rows per task in the row loops: about 32k elements.
inline int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)); }

// The scale as C doubles (none: ones; shared: repeated), so that the loops need no case.
inline std::vector<double> per_channel(const at::Tensor& w, int64_t C) {
  if (w.numel() == 0) return std::vector<double>(C, 1.0);
  const double* wp = w.data_ptr<double>();
  if (w.numel() == 1) return std::vector<double>(C, wp[0]);
  return std::vector<double>(wp, wp + C);
}

inline int64_t block_count(int64_t outer, int64_t inner) {
  return outer * ((inner + kBlock - 1) / kBlock);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define L2NORM_HAVE_AVX2_BUILD 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "_cpu_kernel_loops.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace generic {
#include "_cpu_kernel_loops.h"
}  // namespace generic

// Whether this CPU runs the AVX2 + FMA build of the loops (checked once).
#ifdef L2NORM_HAVE_AVX2_BUILD
#define L2NORM_AVX2(call) avx2::call
#else
#define L2NORM_AVX2(call) generic::call
#endif

bool use_avx2() {
#ifdef L2NORM_HAVE_AVX2_BUILD
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return avx2;
#else
  return false;
#endif
}


void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.is_contiguous(), name,
              " must be a contiguous CPU tensor of shape (outer, C, inner)");
}

// The scale: float64 with C entries, one (shared), or none (no entries).
void check_scale(const at::Tensor& w, const at::Tensor& x) {
  TORCH_CHECK(w.scalar_type() == at::kDouble && w.is_contiguous() &&
                  (w.numel() <= 1 || w.numel() == x.size(1)),
              "the scale must be a contiguous float64 tensor of 0, 1 or C entries");
}

// (y, inv_d, c): y like x; inv_d, c (outer, inner) float64, both 0 on the slices that
// hold NaN or Inf (their y is to be recomputed).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& w,
                                                       int64_t mode, double eps, double thr) {
  check_input(x, "x");
  check_scale(w, x);
  auto y = at::empty_like(x);
  auto opts = x.options().dtype(at::kDouble);
  auto inv_d = at::empty({x.size(0), x.size(2)}, opts);
  auto c = at::empty({x.size(0), x.size(2)}, opts);
  const std::vector<double> scale = per_channel(w, x.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2norm_forward",
                                  [&] {
    if (use_avx2()) {
      L2NORM_AVX2(forward_impl<scalar_t>(x, scale, mode, eps, thr, y, inv_d, c));
    } else {
      generic::forward_impl<scalar_t>(x, scale, mode, eps, thr, y, inv_d, c);
    }
  });
  return {y, inv_d, c};
}

// (dx, dw): dx like x; dw (C) float64, the sum of g x / d over the slices, per channel.
// The slices the forward marked (inv_d = c = 0) must hold zeros in x and g here (their
// g x may be NaN otherwise); their dx comes out 0.
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& x, const at::Tensor& g,
                                            const at::Tensor& w, const at::Tensor& inv_d,
                                            const at::Tensor& c) {
  check_input(x, "x");
  check_input(g, "g");
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(),
              "g must match x in shape and dtype");
  for (const at::Tensor* t : {&inv_d, &c}) {
    TORCH_CHECK(t->scalar_type() == at::kDouble && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) == x.size(0) && t->size(1) == x.size(2),
                "inv_d and c must be the forward's contiguous float64 (outer, inner) tensors");
  }
  check_scale(w, x);
  auto dx = at::empty_like(x);
  auto dw = at::empty({x.size(1)}, x.options().dtype(at::kDouble));
  const std::vector<double> scale = per_channel(w, x.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2norm_backward",
                                  [&] {
    if (use_avx2()) {
      L2NORM_AVX2(backward_impl<scalar_t>(x, g, scale, inv_d, c, dx, dw));
    } else {
      generic::backward_impl<scalar_t>(x, g, scale, inv_d, c, dx, dw);
    }
  });
  return {dx, dw};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "l2norm forward over axis 1 of (outer, C, inner)");
  m.def("backward", &backward, "l2norm backward over axis 1 of (outer, C, inner)");
}
