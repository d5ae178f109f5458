// The loops of l2norm/torch/_cpu_kernel.cpp, included there twice: once compiled for
// AVX2 and FMA, once for the baseline x86-64 (or any other) target; the entry points pick
// one at run time. No include guard on purpose.

// 1 / sqrt(the number of infinite entries) of a slice of C entries `stride` apart.
template <typename scalar_t>
inline double inf_share(const scalar_t* x, int64_t stride, int64_t C) {
  int64_t count = 0;
  for (int64_t ch = 0; ch < C; ++ch) count += std::isinf(static_cast<double>(x[ch * stride]));
  return 1.0 / std::sqrt(static_cast<double>(count));
}

// The limit direction of a slice holding +-Inf (and no NaN): +-1 / sqrt(count) on its
// infinite entries, 0 elsewhere.
inline double limit_of(double v, double share) {
  return std::isinf(v) ? std::copysign(share, v) : 0.0;
}

// An Inf slice's output: the scale times its limit direction.
template <typename scalar_t>
inline void forward_limit(const scalar_t* x, int64_t stride, int64_t C, const double* w,
                          scalar_t* out) {
  const double share = inf_share(x, stride, C);
  for (int64_t ch = 0; ch < C; ++ch) {
    const double v = static_cast<double>(x[ch * stride]);
    out[ch * stride] = static_cast<scalar_t>(w[ch] * limit_of(v, share));
  }
}

// An Inf slice's backward: input gradient 0, scale gradient g times the limit direction.
template <typename scalar_t>
inline void backward_limit(const scalar_t* x, const scalar_t* g, int64_t stride, int64_t C,
                           scalar_t* dx, double* dw_part) {
  const double share = inf_share(x, stride, C);
  for (int64_t ch = 0; ch < C; ++ch) {
    const double v = static_cast<double>(x[ch * stride]);
    dx[ch * stride] = static_cast<scalar_t>(0.0);
    dw_part[ch] += static_cast<double>(g[ch * stride]) * limit_of(v, share);
  }
}

// Rows (inner = 1: channels last in memory): each slice is contiguous, so one pass sums
// its squares in kLanes partial sums and a second, from cache, writes it.
template <typename scalar_t>
void forward_rows(const at::Tensor& x, const std::vector<double>& w, const Placement& pl,
                  at::Tensor& y) {
  const int64_t rows = x.size(0), C = x.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  at::parallel_for(0, rows, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* row = xp + r * C;
      scalar_t* out = yp + r * C;
      double lanes[kLanes] = {};
      int64_t ch = 0;
      for (; ch + kLanes <= C; ch += kLanes) {
        for (int64_t j = 0; j < kLanes; ++j) {
          const double v = static_cast<double>(row[ch + j]);
          lanes[j] += v * v;
        }
      }
      for (; ch < C; ++ch) {
        const double v = static_cast<double>(row[ch]);
        lanes[0] += v * v;
      }
      double n2 = 0.0;
      for (int64_t j = 0; j < kLanes; ++j) n2 += lanes[j];
      const Slice s = slice_terms(n2, pl);
      if (s.infinite) {
        forward_limit(row, 1, C, w.data(), out);
        continue;
      }
      for (ch = 0; ch < C; ++ch) {
        out[ch] = static_cast<scalar_t>(static_cast<double>(row[ch]) * s.inv_d * w[ch]);
      }
    }
  });
}

template <typename scalar_t>
void backward_rows(const at::Tensor& x, const at::Tensor& g, const std::vector<double>& w,
                   const Placement& pl, at::Tensor& dx, at::Tensor& dw) {
  const int64_t rows = x.size(0), C = x.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* gp = g.data_ptr<scalar_t>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  const int threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * C, 0.0);
  at::parallel_for(0, rows, row_grain(C), [&](int64_t r0, int64_t r1) {
    double* dw_part = partial.data() + static_cast<size_t>(at::get_thread_num()) * C;
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = xp + r * C;
      const scalar_t* gr = gp + r * C;
      scalar_t* out = dxp + r * C;
      double sq[kLanes] = {};
      double ipl[kLanes] = {};
      int64_t ch = 0;
      for (; ch + kLanes <= C; ch += kLanes) {
        for (int64_t j = 0; j < kLanes; ++j) {
          const double xv = static_cast<double>(xr[ch + j]);
          sq[j] += xv * xv;
          ipl[j] += w[ch + j] * static_cast<double>(gr[ch + j]) * xv;
        }
      }
      for (; ch < C; ++ch) {
        const double xv = static_cast<double>(xr[ch]);
        sq[0] += xv * xv;
        ipl[0] += w[ch] * static_cast<double>(gr[ch]) * xv;
      }
      double n2 = 0.0, ip = 0.0;
      for (int64_t j = 0; j < kLanes; ++j) {
        n2 += sq[j];
        ip += ipl[j];
      }
      const Slice s = slice_terms(n2, pl);
      if (s.infinite) {
        backward_limit(xr, gr, 1, C, out, dw_part);
        continue;
      }
      const double k = s.r_over_n2 * ip;
      for (ch = 0; ch < C; ++ch) {
        const double gv = static_cast<double>(gr[ch]), xv = static_cast<double>(xr[ch]);
        out[ch] = saturate<scalar_t>((w[ch] * gv - k * xv) * s.inv_d);
        dw_part[ch] += gv * xv * s.inv_d;
      }
    }
  });
  sum_partials(partial, threads, C, dw);
}

template <typename scalar_t>
void forward_impl(const at::Tensor& x, const std::vector<double>& w, const Placement& pl,
                  at::Tensor& y) {
  const int64_t outer = x.size(0), C = x.size(1), inner = x.size(2);
  if (inner == 1) {
    forward_rows<scalar_t>(x, w, pl, y);
    return;
  }
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  at::parallel_for(0, block_count(outer, inner), 1, [&](int64_t b0, int64_t b1) {
    double acc[kBlock];
    double inv_d[kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const Block blk = block_of(b, inner);
      const int64_t base = blk.outer * C * inner + blk.start;
      std::fill(acc, acc + blk.len, 0.0);
      for (int64_t ch = 0; ch < C; ++ch) {
        const scalar_t* row = xp + base + ch * inner;
        for (int64_t p = 0; p < blk.len; ++p) {
          const double v = static_cast<double>(row[p]);
          acc[p] += v * v;
        }
      }
      bool any_inf = false;
      for (int64_t p = 0; p < blk.len; ++p) {
        const Slice s = slice_terms(acc[p], pl);
        inv_d[p] = s.inv_d;
        any_inf |= s.infinite;
      }
      for (int64_t ch = 0; ch < C; ++ch) {
        const scalar_t* row = xp + base + ch * inner;
        scalar_t* out = yp + base + ch * inner;
        const double wc = w[ch];
        for (int64_t p = 0; p < blk.len; ++p) {
          out[p] = static_cast<scalar_t>(static_cast<double>(row[p]) * inv_d[p] * wc);
        }
      }
      if (any_inf) {  // rewrite the few Inf slices with their limit
        for (int64_t p = 0; p < blk.len; ++p) {
          if (std::isinf(acc[p])) forward_limit(xp + base + p, inner, C, w.data(), yp + base + p);
        }
      }
    }
  });
}

// The sum of t[0..len) in kLanes independent partial sums: a reduction the compiler
// vectorizes without -ffast-math.
inline double lane_sum(const double* t, int64_t len) {
  double lanes[kLanes] = {};
  int64_t p = 0;
  for (; p + kLanes <= len; p += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] += t[p + j];
  }
  for (; p < len; ++p) lanes[0] += t[p];
  double total = 0.0;
  for (int64_t j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

template <typename scalar_t>
void backward_impl(const at::Tensor& x, const at::Tensor& g, const std::vector<double>& w,
                   const Placement& pl, at::Tensor& dx, at::Tensor& dw) {
  const int64_t outer = x.size(0), C = x.size(1), inner = x.size(2);
  if (inner == 1) {
    backward_rows<scalar_t>(x, g, w, pl, dx, dw);
    return;
  }
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* gp = g.data_ptr<scalar_t>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  const int threads = at::get_num_threads();
  // Per-thread partial sums of g x / d per channel (the scale's gradient).
  std::vector<double> partial(static_cast<size_t>(threads) * C, 0.0);
  at::parallel_for(0, block_count(outer, inner), 1, [&](int64_t b0, int64_t b1) {
    double n2[kBlock];
    double ip[kBlock];
    double inv_d[kBlock];
    double k[kBlock];
    double t[kBlock];
    double* dw_part = partial.data() + static_cast<size_t>(at::get_thread_num()) * C;
    for (int64_t b = b0; b < b1; ++b) {
      const Block blk = block_of(b, inner);
      const int64_t base = blk.outer * C * inner + blk.start;
      std::fill(n2, n2 + blk.len, 0.0);
      std::fill(ip, ip + blk.len, 0.0);
      for (int64_t ch = 0; ch < C; ++ch) {
        const scalar_t* xr = xp + base + ch * inner;
        const scalar_t* gr = gp + base + ch * inner;
        const double wc = w[ch];
        for (int64_t p = 0; p < blk.len; ++p) {
          const double xv = static_cast<double>(xr[p]);
          n2[p] += xv * xv;
          ip[p] += wc * static_cast<double>(gr[p]) * xv;
        }
      }
      bool any_inf = false;
      for (int64_t p = 0; p < blk.len; ++p) {
        const Slice s = slice_terms(n2[p], pl);
        inv_d[p] = s.inv_d;
        k[p] = s.r_over_n2 * ip[p];
        any_inf |= s.infinite;
      }
      if (any_inf) {  // Inf slices first; the loop below then skips them
        for (int64_t p = 0; p < blk.len; ++p) {
          if (!std::isinf(n2[p])) continue;
          backward_limit(xp + base + p, gp + base + p, inner, C, dxp + base + p, dw_part);
          inv_d[p] = 0.0;
          k[p] = 0.0;
        }
      }
      for (int64_t ch = 0; ch < C; ++ch) {
        const scalar_t* xr = xp + base + ch * inner;
        const scalar_t* gr = gp + base + ch * inner;
        scalar_t* out = dxp + base + ch * inner;
        const double wc = w[ch];
        for (int64_t p = 0; p < blk.len; ++p) {
          const double gv = static_cast<double>(gr[p]), xv = static_cast<double>(xr[p]);
          t[p] = gv * xv * inv_d[p];
          out[p] = saturate<scalar_t>((wc * gv - k[p] * xv) * inv_d[p]);
        }
        if (any_inf) {  // restore what the loop wrote over the Inf slices
          for (int64_t p = 0; p < blk.len; ++p) {
            if (std::isinf(n2[p])) {
              t[p] = 0.0;
              out[p] = static_cast<scalar_t>(0.0);
            }
          }
        }
        dw_part[ch] += lane_sum(t, blk.len);
      }
    }
  });
  sum_partials(partial, threads, C, dw);
}
