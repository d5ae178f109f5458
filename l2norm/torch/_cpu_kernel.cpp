// The native CPU kernel of l2norm.torch (see l2norm/torch/_cpu.py and docs/torch.md).
//
// The input is viewed as (outer, C, inner), contiguous, normalized over C: NCHW with
// outer = N and inner = H * W, or rows (inner = 1) for channels-last memory. Each block
// of `kBlock` neighbouring slices (pixels), or each row, is read twice while it sits in
// the core's cache, so a forward reads x from memory once and writes y once, and a
// backward reads x and g once and writes dx once. Nothing is saved between the two: the
// backward sums the squares again in its first read.
//
// Sums are accumulated in double: a float's square is exact in double and cannot
// overflow or underflow there, so every finite float32 / float16 / bfloat16 slice gets
// its norm to about 1e-13 with no pre-scaling (the one-rung ladder of l2norm/_ladder.py)
// and each output is rounded once. Every slice is computed on its own: a NaN flows
// through the arithmetic (NaN slice, NaN out), and a slice holding +-Inf (its sum is Inf)
// takes the reference's limit in a short extra loop over that block.
//
// The eps placement arrives as (is_add, power, eps): l2norm._modes.EpsMode.kernel_code.
// The formulas below are that table's denominator and ratio, in double.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kBlock = 512;  // slices per block: x and g blocks stay in L2 (C = 512)

// The eps placement of l2norm._modes: d**power = n**power + eps (add) or
// max(n**power, eps) (clamp).
struct Placement {
  bool add;
  int64_t power;
  double eps;
};

// Per slice: 1 / d, r / n^2 (r = n d'(n) / d(n), so that
// dx = (sigma - (r / n^2) <sigma, x> x) / d) and, for a slice holding Inf, 1 / sqrt(count).
struct Slice {
  double inv_d;
  double r_over_n2;
  bool infinite;
};

inline Slice slice_terms(double n2, const Placement& pl) {
  if (std::isinf(n2)) return {0.0, 0.0, true};  // float squares cannot overflow a double
  const double n = std::sqrt(n2);                // NaN stays NaN below
  double d, r;
  if (pl.add) {
    d = pl.power == 1 ? n + pl.eps : std::sqrt(n2 + pl.eps);
    r = pl.power == 1 ? n / d : n2 / (d * d);
  } else {
    const double np = pl.power == 1 ? n : n2;
    const double dp = pl.eps > np ? pl.eps : np;  // keeps a NaN np
    d = pl.power == 1 ? dp : std::sqrt(dp);
    r = np >= pl.eps ? 1.0 : 0.0;
  }
  return {1.0 / d, n2 > 0.0 ? r / n2 : 0.0, false};
}

// The input gradient rounded to the input's dtype, saturating at its largest finite value
// where the exact one exceeds it (an all-zero float16 pixel: scale * g / eps); NaN stays.
template <typename scalar_t>
inline scalar_t saturate(double v) {
  const double m = static_cast<double>(std::numeric_limits<scalar_t>::max());
  return static_cast<scalar_t>(v > m ? m : (v < -m ? -m : v));
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

inline int64_t block_count(int64_t outer, int64_t inner) {
  return outer * ((inner + kBlock - 1) / kBlock);
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

Placement placement(bool is_add, int64_t power, double eps) {
  TORCH_CHECK(power == 1 || power == 2, "power must be 1 or 2");
  return {is_add, power, eps};
}

// y = w * x / d(n) over axis 1 of (outer, C, inner).
at::Tensor forward(const at::Tensor& x, const at::Tensor& w, bool is_add, int64_t power,
                   double eps) {
  check_input(x, "x");
  check_scale(w, x);
  const Placement pl = placement(is_add, power, eps);
  auto y = at::empty_like(x);
  const std::vector<double> scale = per_channel(w, x.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2norm_forward",
                                  [&] {
    if (use_avx2()) {
#ifdef L2NORM_HAVE_AVX2_BUILD
      avx2::forward_impl<scalar_t>(x, scale, pl, y);
#endif
    } else {
      generic::forward_impl<scalar_t>(x, scale, pl, y);
    }
  });
  return y;
}

// (dx, dw): dx like x; dw (C) float64, the sum of g x / d over the slices, per channel.
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& x, const at::Tensor& g,
                                            const at::Tensor& w, bool is_add, int64_t power,
                                            double eps) {
  check_input(x, "x");
  check_input(g, "g");
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(),
              "g must match x in shape and dtype");
  check_scale(w, x);
  const Placement pl = placement(is_add, power, eps);
  auto dx = at::empty_like(x);
  auto dw = at::empty({x.size(1)}, x.options().dtype(at::kDouble));
  const std::vector<double> scale = per_channel(w, x.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2norm_backward",
                                  [&] {
    if (use_avx2()) {
#ifdef L2NORM_HAVE_AVX2_BUILD
      avx2::backward_impl<scalar_t>(x, g, scale, pl, dx, dw);
#endif
    } else {
      generic::backward_impl<scalar_t>(x, g, scale, pl, dx, dw);
    }
  });
  return {dx, dw};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "l2norm forward over axis 1 of (outer, C, inner)");
  m.def("backward", &backward, "l2norm backward over axis 1 of (outer, C, inner)");
}
