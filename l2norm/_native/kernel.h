// The native CPU kernel of l2norm: forward and backward of y = w * x / d(||x||) over the
// middle axis of a contiguous (outer, C, inner) array, on raw pointers (no framework
// headers). capi.cpp exposes it with a plain C ABI (PyTorch calls it through ctypes),
// xla_ffi.cpp as XLA custom calls (JAX).
//
// Each block of `kBlock` neighbouring slices (inner > 1: NCHW pixels), or each row
// (inner == 1: channels last), is read twice while it sits in the core's cache, so a
// forward reads x from memory once and writes y once, and a backward reads x and g once
// and writes dx once. Nothing passes from the forward to the backward: the backward sums
// the squares again in its first read.
//
// Sums are accumulated in double: a float's square is exact in double and cannot overflow
// or underflow there, so every finite float32 / float16 / bfloat16 slice gets its norm to
// about 1e-13 with no pre-scaling (the one-rung ladder of l2norm/_ladder.py) and each
// output is rounded once. Every slice is computed on its own: a NaN flows through the
// arithmetic (NaN slice, NaN out), and a slice holding +-Inf (its sum is Inf) takes the
// reference's limit in a short extra loop over that block.
//
// The eps placement arrives as (is_add, power, eps): l2norm._modes.EpsMode.kernel_code;
// slice_terms below is that table's denominator and ratio, in double.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif

namespace l2norm {

// Keeps subnormals for the lifetime of the guard on this thread. XLA runs its CPU threads
// with flush-to-zero and denormals-are-zero; the kernel must read and write subnormals
// exactly (a slice made of them normalizes to ordinary values). Each thread of a parallel
// region takes one: threads inherit the floating-point mode of the thread that made them.
class KeepSubnormals {
 public:
#if defined(__SSE__) || defined(__x86_64__)
  KeepSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ & ~0x8040u); }  // FTZ, DAZ
  ~KeepSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#elif defined(__aarch64__)
  KeepSubnormals() : saved_(__builtin_aarch64_get_fpcr64()) {
    __builtin_aarch64_set_fpcr64(saved_ & ~(uint64_t(1) << 24));  // FZ
  }
  ~KeepSubnormals() { __builtin_aarch64_set_fpcr64(saved_); }

 private:
  uint64_t saved_;
#endif
};

constexpr int64_t kBlock = 512;  // slices per block: x and g blocks stay in L2 (C = 512)
constexpr int64_t kLanes = 8;    // independent partial sums in the row loops

// ------------------------------------------------------------------ element types

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

struct Float32 {
  using T = float;
  static double load(T v) { return static_cast<double>(v); }
  static T store(double v) { return static_cast<T>(v); }
  static T store_float(float v) { return v; }
  static constexpr double kMax = FLT_MAX;
};

// bfloat16: the top half of a float32; rounded to nearest even from float32.
struct BFloat16 {
  using T = uint16_t;
  static double load(T v) { return static_cast<double>(bits_to_float(uint32_t(v) << 16)); }
  static T store(double v) { return store_float(static_cast<float>(v)); }
  static T store_float(float v) {
    const uint32_t bits = float_to_bits(v);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;  // kept quiet, not rounded to Inf
    return static_cast<T>(nan ? (bits >> 16) | 0x40u : rounded);
  }
  static constexpr double kMax = 3.3895313892515355e38;  // (2 - 2**-7) * 2**127
};

// float16 by IEEE bit manipulation, written without branches so that the loops vectorize
// (a compiler's _Float16 conversions may be library calls per element). Exact both ways:
// half to float is exact (a subnormal half becomes a subnormal-free float through one
// multiplication by 2**112, exact with subnormals kept, see KeepSubnormals); float to half
// rounds to nearest even, Inf and NaN kept.
struct Float16 {
  using T = uint16_t;
  static double load(T v) {
    const uint32_t h = v, sign = (h & 0x8000u) << 16, magnitude = h & 0x7fffu;
    const float scaled = bits_to_float(magnitude << 13) * 5.192296858534828e33f;  // * 2**112
    const uint32_t special = 0x7f800000u | ((magnitude & 0x3ffu) << 13);           // Inf, NaN
    const uint32_t bits = magnitude >= 0x7c00u ? special : float_to_bits(scaled);
    return static_cast<double>(bits_to_float(sign | bits));
  }
  static T store(double v) { return store_float(static_cast<float>(v)); }
  static T store_float(float v) {
    const uint32_t f = float_to_bits(v);
    const uint32_t sign = (f >> 16) & 0x8000u, a = f & 0x7fffffffu;
    // Below 2**-14 (half subnormals): adding 0.5 lines the half's last bit up with the
    // float's, so the float addition itself rounds to nearest even.
    const uint32_t tiny = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
    const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;  // rebias, round
    const uint32_t big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;           // NaN or Inf
    const uint32_t h = a >= 0x47800000u ? big : (a < 0x38800000u ? tiny : normal);
    return static_cast<T>(sign | h);
  }
  static constexpr double kMax = 65504.0;
};

// The input gradient rounded to the input's dtype, saturating at its largest finite value
// where the exact one exceeds it (an all-zero float16 pixel: w * g / eps); NaN stays.
// std::min / std::max keep a NaN first operand and vectorize (an if-else chain does not).
template <typename E>
inline double clamp(double v) {
  return std::min(std::max(v, -E::kMax), E::kMax);
}

template <typename E>
inline typename E::T saturate(double v) {
  return E::store(clamp<E>(v));
}

// ------------------------------------------------------------------ the per-slice formula

// The eps placement of l2norm._modes: d**power = n**power + eps (add) or
// max(n**power, eps) (clamp).
struct Placement {
  bool add;
  int power;
  double eps;
};

// Per slice: 1 / d and r / n^2 (r = n d'(n) / d(n), so that
// dx = (sigma - (r / n^2) <sigma, x> x) / d); `infinite` for a slice holding Inf.
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

// ------------------------------------------------------------------ shape and threads

struct Shape {
  int64_t outer, C, inner;
};

inline int64_t blocks_of(const Shape& s) { return s.outer * ((s.inner + kBlock - 1) / kBlock); }

struct Block {
  int64_t base, len;  // first element of the block's channel-0 row, and its width
};

inline Block block_at(int64_t id, const Shape& s) {
  const int64_t per_row = (s.inner + kBlock - 1) / kBlock;
  const int64_t outer = id / per_row, start = (id % per_row) * kBlock;
  return {outer * s.C * s.inner + start, std::min(kBlock, s.inner - start)};
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// The scale as C doubles (none: ones; shared: repeated), so that the loops need no case.
inline std::vector<double> per_channel(const double* w, int64_t w_len, int64_t C) {
  if (w_len == 0) return std::vector<double>(C, 1.0);
  if (w_len == 1) return std::vector<double>(C, w[0]);
  return std::vector<double>(w, w + C);
}

// ------------------------------------------------------------------ Inf slices

template <typename E>
inline double inf_share(const typename E::T* x, int64_t stride, int64_t C) {
  int64_t count = 0;
  for (int64_t ch = 0; ch < C; ++ch) count += std::isinf(E::load(x[ch * stride]));
  return 1.0 / std::sqrt(static_cast<double>(count));
}

// The limit direction of a slice holding +-Inf (and no NaN): +-1 / sqrt(count) on its
// infinite entries, 0 elsewhere.
inline double limit_of(double v, double share) {
  return std::isinf(v) ? std::copysign(share, v) : 0.0;
}

template <typename E>
void forward_limit(const typename E::T* x, int64_t stride, int64_t C, const double* w,
                   typename E::T* out) {
  const double share = inf_share<E>(x, stride, C);
  for (int64_t ch = 0; ch < C; ++ch) {
    out[ch * stride] = E::store(w[ch] * limit_of(E::load(x[ch * stride]), share));
  }
}

template <typename E>
void backward_limit(const typename E::T* x, const typename E::T* g, int64_t stride, int64_t C,
                    typename E::T* dx, double* dw_part) {
  const double share = inf_share<E>(x, stride, C);
  for (int64_t ch = 0; ch < C; ++ch) {
    dx[ch * stride] = E::store(0.0);
    dw_part[ch] += E::load(g[ch * stride]) * limit_of(E::load(x[ch * stride]), share);
  }
}

// ------------------------------------------------------------------ forward

template <typename E>
void forward_rows(const typename E::T* x, typename E::T* y, const Shape& s,
                  const std::vector<double>& w, const Placement& pl, int threads) {
  const int64_t C = s.C;
#pragma omp parallel num_threads(threads)
  {
    KeepSubnormals keep;
#pragma omp for schedule(static)
  for (int64_t r = 0; r < s.outer; ++r) {
    const typename E::T* row = x + r * C;
    typename E::T* out = y + r * C;
    double lanes[kLanes] = {};
    int64_t ch = 0;
    for (; ch + kLanes <= C; ch += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) {
        const double v = E::load(row[ch + j]);
        lanes[j] += v * v;
      }
    }
    for (; ch < C; ++ch) {
      const double v = E::load(row[ch]);
      lanes[0] += v * v;
    }
    double n2 = 0.0;
    for (int64_t j = 0; j < kLanes; ++j) n2 += lanes[j];
    const Slice sl = slice_terms(n2, pl);
    if (sl.infinite) {
      forward_limit<E>(row, 1, C, w.data(), out);
      continue;
    }
    for (ch = 0; ch < C; ++ch) out[ch] = E::store(E::load(row[ch]) * sl.inv_d * w[ch]);
  }
  }
}

template <typename E>
void forward(const typename E::T* x, typename E::T* y, const Shape& s, const double* w_ptr,
             int64_t w_len, const Placement& pl, int threads) {
  const std::vector<double> w = per_channel(w_ptr, w_len, s.C);
  if (s.inner == 1) {
    forward_rows<E>(x, y, s, w, pl, threads);
    return;
  }
  const int64_t C = s.C, inner = s.inner;
#pragma omp parallel num_threads(threads)
  {
    KeepSubnormals keep;
#pragma omp for schedule(static)
  for (int64_t b = 0; b < blocks_of(s); ++b) {
    double acc[kBlock];
    double inv_d[kBlock];
    const Block blk = block_at(b, s);
    std::fill(acc, acc + blk.len, 0.0);
    for (int64_t ch = 0; ch < C; ++ch) {
      const typename E::T* row = x + blk.base + ch * inner;
      for (int64_t p = 0; p < blk.len; ++p) {
        const double v = E::load(row[p]);
        acc[p] += v * v;
      }
    }
    bool any_inf = false;
    for (int64_t p = 0; p < blk.len; ++p) {
      const Slice sl = slice_terms(acc[p], pl);
      inv_d[p] = sl.inv_d;
      any_inf |= sl.infinite;
    }
    for (int64_t ch = 0; ch < C; ++ch) {
      const typename E::T* row = x + blk.base + ch * inner;
      typename E::T* out = y + blk.base + ch * inner;
      const double wc = w[ch];
      if constexpr (sizeof(typename E::T) == 2) {
        // Two loops: GCC does not vectorize 16- to 64- to 16-bit conversions in one.
        double r[kBlock];
        for (int64_t p = 0; p < blk.len; ++p) r[p] = E::load(row[p]) * inv_d[p] * wc;
        for (int64_t p = 0; p < blk.len; ++p) out[p] = E::store(r[p]);
      } else {
        for (int64_t p = 0; p < blk.len; ++p) out[p] = E::store(E::load(row[p]) * inv_d[p] * wc);
      }
    }
    if (any_inf) {  // rewrite the few Inf slices with their limit
      for (int64_t p = 0; p < blk.len; ++p) {
        if (std::isinf(acc[p])) forward_limit<E>(x + blk.base + p, inner, C, w.data(), y + blk.base + p);
      }
    }
  }
  }
}

// ------------------------------------------------------------------ backward

// dw[ch] = the sum over threads of their partial sums (threads x C, row-major): a fixed
// order, so the result does not depend on timing.
inline void sum_partials(const std::vector<double>& partial, int threads, int64_t C,
                         double* dw) {
  for (int64_t ch = 0; ch < C; ++ch) {
    double total = 0.0;
    for (int t = 0; t < threads; ++t) total += partial[static_cast<size_t>(t) * C + ch];
    dw[ch] = total;
  }
}

template <typename E>
void backward_rows(const typename E::T* x, const typename E::T* g, typename E::T* dx,
                   double* dw, const Shape& s, const std::vector<double>& w,
                   const Placement& pl, int threads) {
  const int64_t C = s.C;
  std::vector<double> partial(static_cast<size_t>(threads) * C, 0.0);
#pragma omp parallel num_threads(threads)
  {
    KeepSubnormals keep;
#pragma omp for schedule(static)
  for (int64_t r = 0; r < s.outer; ++r) {
    double* dw_part = partial.data() + static_cast<size_t>(thread_id()) * C;
    const typename E::T* xr = x + r * C;
    const typename E::T* gr = g + r * C;
    typename E::T* out = dx + r * C;
    double sq[kLanes] = {};
    double ipl[kLanes] = {};
    int64_t ch = 0;
    for (; ch + kLanes <= C; ch += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) {
        const double xv = E::load(xr[ch + j]);
        sq[j] += xv * xv;
        ipl[j] += w[ch + j] * E::load(gr[ch + j]) * xv;
      }
    }
    for (; ch < C; ++ch) {
      const double xv = E::load(xr[ch]);
      sq[0] += xv * xv;
      ipl[0] += w[ch] * E::load(gr[ch]) * xv;
    }
    double n2 = 0.0, ip = 0.0;
    for (int64_t j = 0; j < kLanes; ++j) {
      n2 += sq[j];
      ip += ipl[j];
    }
    const Slice sl = slice_terms(n2, pl);
    if (sl.infinite) {
      backward_limit<E>(xr, gr, 1, C, out, dw_part);
      continue;
    }
    const double k = sl.r_over_n2 * ip;
    for (ch = 0; ch < C; ++ch) {
      const double gv = E::load(gr[ch]), xv = E::load(xr[ch]);
      out[ch] = saturate<E>((w[ch] * gv - k * xv) * sl.inv_d);
      dw_part[ch] += gv * xv * sl.inv_d;
    }
  }
  }
  sum_partials(partial, threads, C, dw);
}

template <typename E>
void backward(const typename E::T* x, const typename E::T* g, typename E::T* dx, double* dw,
              const Shape& s, const double* w_ptr, int64_t w_len, const Placement& pl,
              int threads) {
  const std::vector<double> w = per_channel(w_ptr, w_len, s.C);
  if (s.inner == 1) {
    backward_rows<E>(x, g, dx, dw, s, w, pl, threads);
    return;
  }
  const int64_t C = s.C, inner = s.inner;
  std::vector<double> partial(static_cast<size_t>(threads) * C, 0.0);
#pragma omp parallel num_threads(threads)
  {
    KeepSubnormals keep;
#pragma omp for schedule(static)
  for (int64_t b = 0; b < blocks_of(s); ++b) {
    double n2[kBlock], ip[kBlock], inv_d[kBlock], k[kBlock];
    double* dw_part = partial.data() + static_cast<size_t>(thread_id()) * C;
    const Block blk = block_at(b, s);
    std::fill(n2, n2 + blk.len, 0.0);
    std::fill(ip, ip + blk.len, 0.0);
    for (int64_t ch = 0; ch < C; ++ch) {
      const typename E::T* xr = x + blk.base + ch * inner;
      const typename E::T* gr = g + blk.base + ch * inner;
      const double wc = w[ch];
      for (int64_t p = 0; p < blk.len; ++p) {
        const double xv = E::load(xr[p]);
        n2[p] += xv * xv;
        ip[p] += wc * E::load(gr[p]) * xv;
      }
    }
    bool any_inf = false;
    for (int64_t p = 0; p < blk.len; ++p) {
      const Slice sl = slice_terms(n2[p], pl);
      inv_d[p] = sl.inv_d;
      k[p] = sl.r_over_n2 * ip[p];
      any_inf |= sl.infinite;
    }
    if (any_inf) {  // Inf slices first; the loop below then leaves them alone
      for (int64_t p = 0; p < blk.len; ++p) {
        if (!std::isinf(n2[p])) continue;
        backward_limit<E>(x + blk.base + p, g + blk.base + p, inner, C, dx + blk.base + p,
                          dw_part);
      }
    }
    for (int64_t ch = 0; ch < C; ++ch) {
      const typename E::T* xr = x + blk.base + ch * inner;
      const typename E::T* gr = g + blk.base + ch * inner;
      typename E::T* out = dx + blk.base + ch * inner;
      const double wc = w[ch];
      // The scale's gradient in kLanes independent partial sums, kept in registers.
      double lanes[kLanes] = {};
      if (!any_inf && sizeof(typename E::T) == 2) {
        // Three loops, each of one element width change, which GCC vectorizes (it does not
        // vectorize 16- to 64- to 16-bit conversions in one loop).
        double t[kBlock];
        float r[kBlock];
        for (int64_t p = 0; p < blk.len; ++p) {
          const double gv = E::load(gr[p]), xv = E::load(xr[p]);
          t[p] = gv * xv * inv_d[p];
          r[p] = static_cast<float>(clamp<E>((wc * gv - k[p] * xv) * inv_d[p]));
        }
        int64_t p = 0;
        for (; p + kLanes <= blk.len; p += kLanes) {
          for (int64_t j = 0; j < kLanes; ++j) lanes[j] += t[p + j];
        }
        for (; p < blk.len; ++p) lanes[0] += t[p];
        for (p = 0; p < blk.len; ++p) out[p] = E::store_float(r[p]);
      } else if (!any_inf) {
        int64_t p = 0;
        for (; p + kLanes <= blk.len; p += kLanes) {
          for (int64_t j = 0; j < kLanes; ++j) {
            const double gv = E::load(gr[p + j]), xv = E::load(xr[p + j]);
            lanes[j] += gv * xv * inv_d[p + j];
            out[p + j] = saturate<E>((wc * gv - k[p + j] * xv) * inv_d[p + j]);
          }
        }
        for (; p < blk.len; ++p) {
          const double gv = E::load(gr[p]), xv = E::load(xr[p]);
          lanes[0] += gv * xv * inv_d[p];
          out[p] = saturate<E>((wc * gv - k[p] * xv) * inv_d[p]);
        }
      } else {  // skip the Inf slices: backward_limit wrote their dx and share of dw
        for (int64_t p = 0; p < blk.len; ++p) {
          if (std::isinf(n2[p])) continue;
          const double gv = E::load(gr[p]), xv = E::load(xr[p]);
          lanes[0] += gv * xv * inv_d[p];
          out[p] = saturate<E>((wc * gv - k[p] * xv) * inv_d[p]);
        }
      }
      double total = 0.0;
      for (int64_t j = 0; j < kLanes; ++j) total += lanes[j];
      dw_part[ch] += total;
    }
  }
  }
  sum_partials(partial, threads, C, dw);
}

}  // namespace l2norm
