// The native CPU kernel of l2norm: forward and backward of y = w * x / d(||x||) over the
// middle axis of a contiguous (outer, C, inner) array, on raw pointers (no framework
// headers). capi.cpp exposes it with a plain C ABI (PyTorch calls it through ctypes),
// xla_ffi.cpp as XLA custom calls (JAX).
//
// Each block of neighbouring slices (inner > 1: NCHW pixels; rows of kRowBytes), or each
// row (inner == 1: channels last), is read twice while it sits in the core's cache, so a
// forward reads x from memory once and writes y once, and a backward reads x and g once
// and writes dx once. Nothing passes from the forward to the backward: the backward sums
// the squares again in its first read. Large outputs are written with streaming stores
// (kStreamBytes), which skip reading the output's lines before writing them.
//
// Sums are accumulated in double: a float's square is exact in double and cannot overflow
// or underflow there, so every finite float32 / float16 / bfloat16 slice gets its norm to
// about 1e-13 with no pre-scaling (the one-rung ladder of l2norm/_ladder.py). The second
// pass (y, dx) runs in double too, except for float16, whose range lets float32 do it
// (float_arithmetic); each output is rounded once from that. Every slice is computed on
// its own: a NaN flows through the arithmetic (NaN slice, NaN out), and a slice holding
// +-Inf (its sum is Inf) takes the reference's limit in a short extra loop over that block.
//
// Every call is told its shape, scale, eps placement and threads in one struct, Params
// (below), from the callers to the loops; slice_terms is the mode table's denominator and
// ratio (l2norm._modes), in double.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__SSE2__) || defined(__x86_64__)
#include <immintrin.h>
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

// Slices per block (block_slices): up to kBlockBytes of each tensor, so that a block is
// still in the cache when the second pass reads it again, in rows of at least kRowBytes
// (shorter rows cost more in loop and prefetcher restarts than the cache saves) and at
// most kMaxSlices. SSD's conv4_3 (C = 512, 38 x 38 pixels) takes a whole sample a block:
// one contiguous 2.9 MB read in float32.
constexpr int64_t kRowBytes = 2048;
constexpr int64_t kBlockBytes = int64_t(4) << 20;
constexpr int64_t kMaxSlices = 2048;
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
  static float load_float(T v) { return v; }
  static double load(T v) { return static_cast<double>(v); }
  static T store(double v) { return static_cast<T>(v); }
  static T store_float(float v) { return v; }
  static constexpr double kMax = FLT_MAX;
};

// bfloat16: the top half of a float32; rounded to nearest even from float32.
struct BFloat16 {
  using T = uint16_t;
  static float load_float(T v) { return bits_to_float(uint32_t(v) << 16); }
  static double load(T v) { return static_cast<double>(load_float(v)); }
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
  static float load_float(T v) {
    const uint32_t h = v, sign = (h & 0x8000u) << 16, magnitude = h & 0x7fffu;
    const float scaled = bits_to_float(magnitude << 13) * 5.192296858534828e33f;  // * 2**112
    const uint32_t special = 0x7f800000u | ((magnitude & 0x3ffu) << 13);           // Inf, NaN
    const uint32_t bits = magnitude >= 0x7c00u ? special : float_to_bits(scaled);
    return bits_to_float(sign | bits);
  }
  static double load(T v) { return static_cast<double>(load_float(v)); }
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
template <typename E, typename V>
inline V clamp(V v) {
  const V big = static_cast<V>(E::kMax);  // exact in float too
  return std::min(std::max(v, -big), big);
}

template <typename E>
inline typename E::T saturate(double v) {
  return E::store(clamp<E>(v));
}

// ------------------------------------------------------------------ rows through the L1 cache

// Whether rows of E are widened to float32 once, into an L1 buffer, before the arithmetic
// reads them: float16 where the build has the F16C instructions (the portable bit
// manipulation of Float16::load_float costs more than the rest of the arithmetic).
// float32 and bfloat16 (a shift) are read where they lie.
template <typename E>
constexpr bool kWidenRows =
#if defined(__F16C__)
    std::is_same_v<E, Float16>;
#else
    false;
#endif

// A row of n <= kMaxSlices entries as the arithmetic reads it: the row itself, or its float32
// values widened into buf (kWidenRows).
template <typename E>
using RowOf = std::conditional_t<kWidenRows<E>, const float*, const typename E::T*>;

template <typename E>
inline RowOf<E> row_of(const typename E::T* row, int64_t n, float* buf) {
  if constexpr (kWidenRows<E>) {
    int64_t p = 0;
#if defined(__F16C__)
    for (; p + 8 <= n; p += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + p));
      _mm256_storeu_ps(buf + p, _mm256_cvtph_ps(h));
    }
#endif
    for (; p < n; ++p) buf[p] = E::load_float(row[p]);
    return buf;
  } else {
    return row;
  }
}

// Entry p of a row from row_of, exactly, as a double.
template <typename E>
inline double value(RowOf<E> row, int64_t p) {
  if constexpr (kWidenRows<E>) {
    return row[p];
  } else {
    return E::load(row[p]);
  }
}

// Rounds a row of float32 values to the element type (round to nearest even, like
// E::store_float; F16C for float16 where the build has it).
template <typename E>
inline void narrow_row(const float* r, int64_t n, typename E::T* out) {
  int64_t p = 0;
#if defined(__F16C__)
  if constexpr (std::is_same_v<E, Float16>) {
    for (; p + 8 <= n; p += 8) {
      const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(r + p), _MM_FROUND_TO_NEAREST_INT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + p), h);
    }
  }
#endif
  for (; p < n; ++p) out[p] = E::store_float(r[p]);
}

// Whether the second pass of E runs in float32 rather than double: float16, whose whole
// range float32 holds with room to spare. A nonzero float16 slice has n >= 2**-24, so
// 1 / d <= 2**24 (2**24 sqrt(C) for a mean, below 2**56 for any C an int64 holds) and no
// product below leaves float32 (|k x| <= ||w g|| in the backward); a zero slice's larger
// 1 / d is clamped to the largest float (0 times it is still 0).
// float32 arithmetic carries a relative error of a few 2**-24, far inside float16's
// 2**-11, and doubles the lanes. bfloat16 keeps double: its slices reach 2**-133, whose
// 1 / d float32 cannot hold. So do scales beyond 2**32 (none in practice).
template <typename E>
inline bool float_arithmetic(const std::vector<double>& w) {
  if constexpr (!std::is_same_v<E, Float16>) return false;
  return std::all_of(w.begin(), w.end(), [](double v) { return std::abs(v) <= 0x1p32; });
}

// 1 / d as the float32 arithmetic uses it (see float_arithmetic); Inf and NaN kept.
inline float inv_d_float(double inv_d) {
  return static_cast<float>(std::isinf(inv_d) ? inv_d : std::min(inv_d, double(FLT_MAX)));
}

// Outputs of at least this many bytes are written with streaming (non-temporal) stores:
// they do not fit a core's caches anyway, and a plain store first reads each line it
// misses (a third memory pass) and evicts the input block the next pass reads again.
// Smaller outputs stay in the cache for the layer that reads them next. The arithmetic
// is the same either way, so the choice changes no result.
constexpr int64_t kStreamBytes = int64_t(8) << 20;

// Copies fewer than 64 bytes (an even count) with inline moves: a row's unaligned ends.
inline void copy_short(char* dst, const char* src, int64_t bytes) {
  for (; bytes >= 8; bytes -= 8, dst += 8, src += 8) std::memcpy(dst, src, 8);
  for (; bytes >= 2; bytes -= 2, dst += 2, src += 2) std::memcpy(dst, src, 2);
}

// Copies a finished row (computed into an L1 buffer) to its place in the output: with
// streaming stores of its whole 64-byte lines if `stream`, its unaligned ends (shared with
// the neighbouring blocks' rows) with plain stores.
inline void write_row(void* dst_ptr, const void* src_ptr, int64_t bytes, bool stream) {
  char* dst = static_cast<char*>(dst_ptr);
  const char* src = static_cast<const char*>(src_ptr);
#if defined(__SSE2__)
  if (stream && bytes >= 128) {
    const int64_t head = -reinterpret_cast<uintptr_t>(dst) & 63;
    copy_short(dst, src, head);
    dst += head, src += head, bytes -= head;
    for (; bytes >= 64; bytes -= 64, dst += 64, src += 64) {
#if defined(__AVX512F__)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), _mm512_loadu_si512(src));
#elif defined(__AVX__)
      for (int k = 0; k < 64; k += 32) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k));
        _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + k), v);
      }
#else
      for (int k = 0; k < 64; k += 16) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k));
        _mm_stream_si128(reinterpret_cast<__m128i*>(dst + k), v);
      }
#endif
    }
    copy_short(dst, src, bytes);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

// Orders this thread's streaming stores before whatever reads the output next.
inline void end_streaming() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// ------------------------------------------------------------------ the parameters

// The version of the interface of capi.cpp (the Params layout and the entry points):
// l2norm._native reads it from this line and refuses a library reporting another.
constexpr int kAbiVersion = 2;

// (outer, C, inner): the middle axis is normalized, each slice holds its C entries.
struct Shape {
  int64_t outer, C, inner;
};

// How many scale entries a call passes: none (a scale of ones), one for every channel, or
// one per channel.
enum ScaleKind : int32_t { kNoScale = 0, kSharedScale = 1, kScalePerChannel = 2 };

// Everything a call is told besides its pointers and dtype. The C ABI takes it by pointer
// (l2norm._native.Params mirrors it with ctypes, field for field); the XLA handlers fill
// it from their attributes, which carry the same names (xla_ffi.cpp, ReadCall).
struct Params {
  Shape shape;
  double eps;
  int32_t scale;    // a ScaleKind
  int32_t is_add;   // the eps placement, l2norm._modes.EpsMode.kernel_code: eps added (1)
  int32_t power;    // or a floor (0); it meets the norm (1) or the sum of squares (2),
  int32_t mean;     // divided by C first (1: the mean of the squares, RMSNorm; power 2)
  int32_t threads;  // at most this many threads
};

// Whether the kernel takes `params` (zero sizes are valid: it returns at once, zeroing dw).
inline bool valid(const Params& params) {
  const Shape& s = params.shape;
  const bool placement = (params.is_add == 0 || params.is_add == 1) &&
                         (params.power == 1 || params.power == 2) &&
                         (params.mean == 0 || (params.mean == 1 && params.power == 2));
  return s.outer >= 0 && s.C >= 0 && s.inner >= 0 && params.scale >= kNoScale &&
         params.scale <= kScalePerChannel && placement && params.threads > 0;
}

// The scale entries a call passes: 0, 1 or C.
inline int64_t scale_entries(const Params& params) {
  return params.scale == kNoScale ? 0 : (params.scale == kSharedScale ? 1 : params.shape.C);
}

// ------------------------------------------------------------------ the per-slice formula

// Per slice: 1 / d and r / n^2 (r = n d'(n) / d(n), so that
// dx = (sigma - (r / n^2) <sigma, x> x) / d); `infinite` for a slice holding Inf.
struct Slice {
  double inv_d;
  double r_over_n2;
  bool infinite;
};

// m is what eps meets: the norm n, the sum of squares n^2, or their mean n^2 / C (the
// division exact to a rounding, and n^2 / C >= 2**-361 > 0 for a nonzero float slice).
// Added, d**power = m + eps and r = m / d**power (so r / n^2 = 1 / (C d^2) for a mean);
// a floor, r is 1 above it and 0 below.
inline Slice slice_terms(double n2, const Params& params) {
  if (std::isinf(n2)) return {0.0, 0.0, true};  // float squares cannot overflow a double
  const double n = std::sqrt(n2);                // NaN stays NaN below
  const double count = static_cast<double>(params.shape.C);
  const double m = params.power == 1 ? n : (params.mean ? n2 / count : n2);
  double d, r_over_n2;
  if (params.is_add) {
    d = params.power == 1 ? m + params.eps : std::sqrt(m + params.eps);
    const double r = params.power == 1 ? n / d : m / (d * d);
    r_over_n2 = params.mean ? 1.0 / (count * (d * d)) : r / n2;
  } else {
    const double dp = params.eps > m ? params.eps : m;  // keeps a NaN m
    d = params.power == 1 ? dp : std::sqrt(dp);
    r_over_n2 = (m >= params.eps ? 1.0 : 0.0) / n2;
  }
  return {1.0 / d, n2 > 0.0 ? r_over_n2 : 0.0, false};
}

// ------------------------------------------------------------------ shape and threads

inline int64_t block_slices(const Shape& s, int64_t item_bytes) {
  const int64_t by_bytes = kBlockBytes / (s.C * item_bytes);
  return std::min(s.inner, std::clamp(by_bytes, kRowBytes / item_bytes, kMaxSlices));
}

inline int64_t blocks_of(const Shape& s, int64_t slices) {
  return s.outer * ((s.inner + slices - 1) / slices);
}

struct Block {
  int64_t base, len;  // first element of the block's channel-0 row, and its width
};

inline Block block_at(int64_t id, const Shape& s, int64_t slices) {
  const int64_t per_row = (s.inner + slices - 1) / slices;
  const int64_t outer = id / per_row, start = (id % per_row) * slices;
  return {outer * s.C * s.inner + start, std::min(slices, s.inner - start)};
}

// Threads worth waking for `units` independent pieces of work (rows, or blocks) over the
// tensor: one per kMinThreadElements elements at most. Below that a parallel region costs
// more than it saves, and on a loaded machine its join waits for a descheduled thread (a
// 19 ms 90th percentile at 8192 elements). Measured with the C ABI at 1 and 2 threads on
// 2 cores (forward and backward, rows and blocks, 4K to 4M elements): two threads first
// pay off at 16K-32K elements.
constexpr int64_t kMinThreadElements = 16384;

inline int threads_for(const Shape& s, int64_t units, int threads) {
  const int64_t by_work = s.outer * s.C * s.inner / kMinThreadElements;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({threads, units, by_work})));
}

inline bool empty(const Shape& s) { return s.outer == 0 || s.C == 0 || s.inner == 0; }

// A thread's per-block arrays of kMaxSlices entries each, on the heap (a few hundred KiB:
// too much for the stacks of the threads that call the kernel). Left uninitialised: every
// entry is written before it is read, and zeroing ~100 KiB took ~3 us of an 8 us call
// at (1, 512, 4, 4).
template <typename T>
struct Scratch {
  std::unique_ptr<double[]> doubles;
  std::unique_ptr<float[]> floats;
  std::unique_ptr<T[]> out;
  Scratch(int n_doubles, int n_floats)
      : doubles(new double[size_t(n_doubles) * kMaxSlices]),
        floats(new float[size_t(n_floats) * kMaxSlices]), out(new T[kMaxSlices]) {}
  double* d(int i) { return doubles.get() + size_t(i) * kMaxSlices; }
  float* f(int i) { return floats.get() + size_t(i) * kMaxSlices; }
};

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// The scale as C doubles (none: ones; shared: repeated), so that the loops need no case.
inline std::vector<double> per_channel(const double* w, const Params& params) {
  const int64_t C = params.shape.C;
  if (params.scale == kNoScale) return std::vector<double>(C, 1.0);
  if (params.scale == kSharedScale) return std::vector<double>(C, w[0]);
  return std::vector<double>(w, w + C);
}

// ------------------------------------------------------------------ Inf slices

// What each of the k infinite entries of a slice tends to, in magnitude: n / d(n) tends to
// 1 (sqrt(C) for a mean), shared by the k as 1 / sqrt(k) (sqrt(C / k), rounded once).
template <typename E>
inline double inf_share(const typename E::T* x, int64_t stride, const Params& params) {
  int64_t count = 0;
  for (int64_t ch = 0; ch < params.shape.C; ++ch) count += std::isinf(E::load(x[ch * stride]));
  const double k = static_cast<double>(count);
  return params.mean ? std::sqrt(static_cast<double>(params.shape.C) / k) : 1.0 / std::sqrt(k);
}

// The limit of a slice holding +-Inf (and no NaN): +-share on its infinite entries, 0
// elsewhere.
inline double limit_of(double v, double share) {
  return std::isinf(v) ? std::copysign(share, v) : 0.0;
}

template <typename E>
void forward_limit(const typename E::T* x, int64_t stride, const Params& params,
                   const double* w, typename E::T* out) {
  const double share = inf_share<E>(x, stride, params);
  for (int64_t ch = 0; ch < params.shape.C; ++ch) {
    out[ch * stride] = E::store(w[ch] * limit_of(E::load(x[ch * stride]), share));
  }
}

template <typename E>
void backward_limit(const typename E::T* x, const typename E::T* g, int64_t stride,
                    const Params& params, typename E::T* dx, double* dw_part) {
  const double share = inf_share<E>(x, stride, params);
  for (int64_t ch = 0; ch < params.shape.C; ++ch) {
    dx[ch * stride] = E::store(0.0);
    dw_part[ch] += E::load(g[ch * stride]) * limit_of(E::load(x[ch * stride]), share);
  }
}

// ------------------------------------------------------------------ forward

template <typename E>
void forward_rows(const typename E::T* x, typename E::T* y, const Params& params,
                  const std::vector<double>& w, int threads) {
  const Shape& s = params.shape;
  const int64_t C = s.C;
#pragma omp parallel num_threads(threads) if (threads > 1)
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
    const Slice sl = slice_terms(n2, params);
    if (sl.infinite) {
      forward_limit<E>(row, 1, params, w.data(), out);
      continue;
    }
    for (ch = 0; ch < C; ++ch) out[ch] = E::store(E::load(row[ch]) * sl.inv_d * w[ch]);
  }
  }
}

// Adds the squares of rows [ch, ch + count) of a block to n2 (count <= 4): four rows a
// pass, so that each partial sum is read and written once per four rows, and four memory
// streams run at once.
template <typename E>
inline void add_squares(const typename E::T* first, int64_t inner, int64_t count, int64_t len,
                        double* n2, float* bufs) {
  RowOf<E> r[4];
  for (int64_t k = 0; k < count; ++k) {
    r[k] = row_of<E>(first + k * inner, len, bufs + k * kMaxSlices);
  }
  if (count == 4) {
    for (int64_t p = 0; p < len; ++p) {
      const double a = value<E>(r[0], p), b = value<E>(r[1], p);
      const double c = value<E>(r[2], p), d = value<E>(r[3], p);
      n2[p] += (a * a + b * b) + (c * c + d * d);
    }
    return;
  }
  for (int64_t k = 0; k < count; ++k) {
    for (int64_t p = 0; p < len; ++p) n2[p] += value<E>(r[k], p) * value<E>(r[k], p);
  }
}

template <typename E>
void forward(const Params& params, const typename E::T* x, const double* w_ptr,
             typename E::T* y) {
  using T = typename E::T;
  const Shape& s = params.shape;
  if (empty(s)) return;
  const std::vector<double> w = per_channel(w_ptr, params);
  if (s.inner == 1) {
    forward_rows<E>(x, y, params, w, threads_for(s, s.outer, params.threads));
    return;
  }
  const int64_t C = s.C, inner = s.inner;
  const bool stream = s.outer * C * inner * int64_t(sizeof(T)) >= kStreamBytes;
  const bool fast = float_arithmetic<E>(w);
  const int64_t slices = block_slices(s, sizeof(T));
  const int threads = threads_for(s, blocks_of(s, slices), params.threads);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    KeepSubnormals keep;
    Scratch<T> scratch(2, 3 + 4);  // and add_squares's four row buffers
#pragma omp for schedule(static)
  for (int64_t b = 0; b < blocks_of(s, slices); ++b) {
    double *acc = scratch.d(0), *inv_d = scratch.d(1);
    float *xbuf = scratch.f(0), *r = scratch.f(1), *inv_f = scratch.f(2);
    T* done = scratch.out.get();
    const Block blk = block_at(b, s, slices);
    std::fill(acc, acc + blk.len, 0.0);
    for (int64_t ch = 0; ch < C; ch += 4) {
      add_squares<E>(x + blk.base + ch * inner, inner, std::min<int64_t>(4, C - ch), blk.len, acc,
                     scratch.f(3));
    }
    bool any_inf = false;
    for (int64_t p = 0; p < blk.len; ++p) {
      const Slice sl = slice_terms(acc[p], params);
      inv_d[p] = sl.inv_d;
      any_inf |= sl.infinite;
    }
    if (fast) {
      for (int64_t p = 0; p < blk.len; ++p) inv_f[p] = inv_d_float(inv_d[p]);
    }
    for (int64_t ch = 0; ch < C; ++ch) {
      const RowOf<E> xr = row_of<E>(x + blk.base + ch * inner, blk.len, xbuf);
      const double wc = w[ch];
      if (fast) {
        const float wf = static_cast<float>(wc);
        for (int64_t p = 0; p < blk.len; ++p) {
          r[p] = static_cast<float>(value<E>(xr, p)) * inv_f[p] * wf;
        }
      } else {  // from double: float32 rounded once, bfloat16 through float (faithful)
        for (int64_t p = 0; p < blk.len; ++p) {
          r[p] = static_cast<float>(value<E>(xr, p) * inv_d[p] * wc);
        }
      }
      if constexpr (!std::is_same_v<T, float>) narrow_row<E>(r, blk.len, done);
      const void* row = std::is_same_v<T, float> ? static_cast<const void*>(r) : done;
      write_row(y + blk.base + ch * inner, row, blk.len * int64_t(sizeof(T)), stream);
    }
    if (any_inf) {  // rewrite the few Inf slices with their limit
      if (stream) end_streaming();
      for (int64_t p = 0; p < blk.len; ++p) {
        if (!std::isinf(acc[p])) continue;
        forward_limit<E>(x + blk.base + p, inner, params, w.data(), y + blk.base + p);
      }
    }
  }
    if (stream) end_streaming();
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
                   double* dw, const Params& params, const std::vector<double>& w,
                   int threads) {
  const Shape& s = params.shape;
  const int64_t C = s.C;
  std::vector<double> partial(static_cast<size_t>(threads) * C, 0.0);
#pragma omp parallel num_threads(threads) if (threads > 1)
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
    const Slice sl = slice_terms(n2, params);
    if (sl.infinite) {
      backward_limit<E>(xr, gr, 1, params, out, dw_part);
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

// Adds rows [ch, ch + count) of a block (count <= 4) to the squares n2 and to the
// products ip of the scaled cotangent with the input, four rows a pass as in add_squares.
template <typename E>
inline void add_squares_and_products(const typename E::T* x, const typename E::T* g,
                                     const double* w, int64_t inner, int64_t count,
                                     int64_t len, double* n2, double* ip, float* bufs) {
  RowOf<E> xr[4], gr[4];
  for (int64_t k = 0; k < count; ++k) {
    xr[k] = row_of<E>(x + k * inner, len, bufs + k * kMaxSlices);
    gr[k] = row_of<E>(g + k * inner, len, bufs + (4 + k) * kMaxSlices);
  }
  if (count == 4) {
    for (int64_t p = 0; p < len; ++p) {
      const double a = value<E>(xr[0], p), b = value<E>(xr[1], p);
      const double c = value<E>(xr[2], p), d = value<E>(xr[3], p);
      n2[p] += (a * a + b * b) + (c * c + d * d);
      ip[p] += (w[0] * value<E>(gr[0], p) * a + w[1] * value<E>(gr[1], p) * b) +
               (w[2] * value<E>(gr[2], p) * c + w[3] * value<E>(gr[3], p) * d);
    }
    return;
  }
  for (int64_t k = 0; k < count; ++k) {
    for (int64_t p = 0; p < len; ++p) {
      const double v = value<E>(xr[k], p);
      n2[p] += v * v;
      ip[p] += w[k] * value<E>(gr[k], p) * v;
    }
  }
}

template <typename E>
void backward(const Params& params, const typename E::T* x, const typename E::T* g,
              const double* w_ptr, typename E::T* dx, double* dw) {
  using T = typename E::T;
  const Shape& s = params.shape;
  if (empty(s)) {  // no slices: the scale's gradient is zero
    std::fill(dw, dw + s.C, 0.0);
    return;
  }
  const std::vector<double> w = per_channel(w_ptr, params);
  if (s.inner == 1) {
    backward_rows<E>(x, g, dx, dw, params, w, threads_for(s, s.outer, params.threads));
    return;
  }
  const int64_t C = s.C, inner = s.inner;
  const bool stream = s.outer * C * inner * int64_t(sizeof(T)) >= kStreamBytes;
  const bool fast = float_arithmetic<E>(w);
  const int64_t slices = block_slices(s, sizeof(T));
  const int threads = threads_for(s, blocks_of(s, slices), params.threads);
  std::vector<double> partial(static_cast<size_t>(threads) * C, 0.0);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    KeepSubnormals keep;
    Scratch<T> scratch(5, 5 + 8);  // and add_squares_and_products's eight
#pragma omp for schedule(static)
  for (int64_t b = 0; b < blocks_of(s, slices); ++b) {
    double *n2 = scratch.d(0), *ip = scratch.d(1), *inv_d = scratch.d(2), *k = scratch.d(3);
    double* k_inv_d = scratch.d(4);
    float *xbuf = scratch.f(0), *gbuf = scratch.f(1), *r = scratch.f(2);
    float *inv_f = scratch.f(3), *k_f = scratch.f(4);
    T* done = scratch.out.get();
    double* dw_part = partial.data() + static_cast<size_t>(thread_id()) * C;
    const Block blk = block_at(b, s, slices);
    std::fill(n2, n2 + blk.len, 0.0);
    std::fill(ip, ip + blk.len, 0.0);
    for (int64_t ch = 0; ch < C; ch += 4) {
      const int64_t at = blk.base + ch * inner;
      add_squares_and_products<E>(x + at, g + at, w.data() + ch, inner,
                                  std::min<int64_t>(4, C - ch), blk.len, n2, ip, scratch.f(5));
    }
    bool any_inf = false;
    for (int64_t p = 0; p < blk.len; ++p) {
      const Slice sl = slice_terms(n2[p], params);
      inv_d[p] = sl.inv_d;
      k[p] = sl.r_over_n2 * ip[p];
      any_inf |= sl.infinite;
    }
    // dx = w g / d - (k / d) x and the scale's gradient g x / d, from a = g / d.
    for (int64_t p = 0; p < blk.len; ++p) k_inv_d[p] = k[p] * inv_d[p];
    if (fast) {
      for (int64_t p = 0; p < blk.len; ++p) {
        inv_f[p] = inv_d_float(inv_d[p]);
        k_f[p] = static_cast<float>(k[p]);
      }
    }
    for (int64_t ch = 0; ch < C; ++ch) {
      const int64_t at = blk.base + ch * inner;
      const RowOf<E> xr = row_of<E>(x + at, blk.len, xbuf);
      const RowOf<E> gr = row_of<E>(g + at, blk.len, gbuf);
      const double wc = w[ch];
      const float wf = static_cast<float>(wc);
      // The scale's gradient in kLanes independent partial sums, kept in registers; an Inf
      // slice adds nothing here (backward_limit below adds its share). The loop is written
      // once per (float32 or double arithmetic, Inf slices in the block or not), so that
      // each version vectorizes.
      double lanes[kLanes] = {};
      auto pass = [&](auto in_float, auto masked) {
        auto entry = [&](int64_t p, double& lane) {
          double term;
          if constexpr (decltype(in_float)::value) {
            const float gv = static_cast<float>(value<E>(gr, p));
            const float xv = static_cast<float>(value<E>(xr, p));
            term = gv * inv_f[p] * xv;
            r[p] = clamp<E>((wf * gv - k_f[p] * xv) * inv_f[p]);
          } else {
            const double gv = value<E>(gr, p), xv = value<E>(xr, p);
            const double a = gv * inv_d[p];
            term = a * xv;
            // Rounded to float, then clamped: the same as clamping first, and cheaper.
            r[p] = clamp<E>(static_cast<float>(wc * a - k_inv_d[p] * xv));
          }
          if constexpr (decltype(masked)::value) term = std::isinf(n2[p]) ? 0.0 : term;
          lane += term;
        };
        int64_t p = 0;
        for (; p + kLanes <= blk.len; p += kLanes) {
          for (int64_t j = 0; j < kLanes; ++j) entry(p + j, lanes[j]);
        }
        for (; p < blk.len; ++p) entry(p, lanes[0]);
      };
      using yes = std::true_type;
      using no = std::false_type;
      if (fast) {
        any_inf ? pass(yes{}, yes{}) : pass(yes{}, no{});
      } else {
        any_inf ? pass(no{}, yes{}) : pass(no{}, no{});
      }
      double total = 0.0;
      for (int64_t j = 0; j < kLanes; ++j) total += lanes[j];
      dw_part[ch] += total;
      if constexpr (!std::is_same_v<T, float>) narrow_row<E>(r, blk.len, done);
      const void* row = std::is_same_v<T, float> ? static_cast<const void*>(r) : done;
      write_row(dx + at, row, blk.len * int64_t(sizeof(T)), stream);
    }
    if (any_inf) {  // Inf slices: their limit, after (and ordered after) the rows above
      if (stream) end_streaming();
      for (int64_t p = 0; p < blk.len; ++p) {
        if (!std::isinf(n2[p])) continue;
        backward_limit<E>(x + blk.base + p, g + blk.base + p, inner, params,
                          dx + blk.base + p, dw_part);
      }
    }
  }
    if (stream) end_streaming();
  }
  sum_partials(partial, threads, C, dw);
}

}  // namespace l2norm
