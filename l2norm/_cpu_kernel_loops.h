// The loops of l2norm/_cpu_kernel.cpp, included there twice: once compiled for AVX2 and
// FMA, once for the baseline x86-64 (or any other) target; the entry points pick one at
// run time. No include guard on purpose.

// Rows (inner = 1: channels last in memory): each slice is contiguous, so one pass sums
// its squares in kLanes partial sums and a second, from cache, writes it.
template <typename scalar_t>
void forward_rows(const at::Tensor& x, const std::vector<double>& w, int64_t mode, double eps,
                  double thr, at::Tensor& y, at::Tensor& inv_d_out, at::Tensor& c_out) {
  const int64_t rows = x.size(0), C = x.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  double* inv_dp = inv_d_out.data_ptr<double>();
  double* cp = c_out.data_ptr<double>();
  at::parallel_for(0, rows, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* row = xp + r * C;
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
      slice_factors(n2, mode, eps, thr, &inv_dp[r], &cp[r]);
      const double inv_d = inv_dp[r];
      scalar_t* out = yp + r * C;
      for (ch = 0; ch < C; ++ch) {
        out[ch] = static_cast<scalar_t>(static_cast<double>(row[ch]) * inv_d * w[ch]);
      }
    }
  });
}

template <typename scalar_t>
void backward_rows(const at::Tensor& x, const at::Tensor& g, const std::vector<double>& w,
                   const at::Tensor& inv_d_in, const at::Tensor& c_in, at::Tensor& dx,
                   at::Tensor& dw) {
  const int64_t rows = x.size(0), C = x.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* gp = g.data_ptr<scalar_t>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  const double* inv_dp = inv_d_in.data_ptr<double>();
  const double* cp = c_in.data_ptr<double>();
  const int threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * C, 0.0);
  at::parallel_for(0, rows, row_grain(C), [&](int64_t r0, int64_t r1) {
    double* dw_part = partial.data() + static_cast<size_t>(at::get_thread_num()) * C;
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = xp + r * C;
      const scalar_t* gr = gp + r * C;
      double lanes[kLanes] = {};
      int64_t ch = 0;
      for (; ch + kLanes <= C; ch += kLanes) {
        for (int64_t j = 0; j < kLanes; ++j) {
          lanes[j] += w[ch + j] * static_cast<double>(gr[ch + j]) * static_cast<double>(xr[ch + j]);
        }
      }
      for (; ch < C; ++ch) {
        lanes[0] += w[ch] * static_cast<double>(gr[ch]) * static_cast<double>(xr[ch]);
      }
      double ip = 0.0;
      for (int64_t j = 0; j < kLanes; ++j) ip += lanes[j];
      const double inv_d = inv_dp[r];
      const double k = cp[r] * ip * inv_d;
      scalar_t* out = dxp + r * C;
      for (ch = 0; ch < C; ++ch) {
        const double gv = static_cast<double>(gr[ch]), xv = static_cast<double>(xr[ch]);
        out[ch] = static_cast<scalar_t>((w[ch] * gv - k * xv) * inv_d);
        dw_part[ch] += gv * xv * inv_d;
      }
    }
  });
  sum_partials(partial, threads, C, dw);
}

template <typename scalar_t>
void forward_impl(const at::Tensor& x, const std::vector<double>& w, int64_t mode, double eps,
                  double thr, at::Tensor& y, at::Tensor& inv_d_out, at::Tensor& c_out) {
  const int64_t outer = x.size(0), C = x.size(1), inner = x.size(2);
  if (inner == 1) {
    forward_rows<scalar_t>(x, w, mode, eps, thr, y, inv_d_out, c_out);
    return;
  }
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  double* inv_dp = inv_d_out.data_ptr<double>();
  double* cp = c_out.data_ptr<double>();
  at::parallel_for(0, block_count(outer, inner), 1, [&](int64_t b0, int64_t b1) {
    double acc[kBlock];
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
      double* inv_d = inv_dp + blk.outer * inner + blk.start;
      double* c = cp + blk.outer * inner + blk.start;
      for (int64_t p = 0; p < blk.len; ++p) {
        slice_factors(acc[p], mode, eps, thr, &inv_d[p], &c[p]);
      }
      for (int64_t ch = 0; ch < C; ++ch) {
        const scalar_t* row = xp + base + ch * inner;
        scalar_t* out = yp + base + ch * inner;
        const double wc = w[ch];
        for (int64_t p = 0; p < blk.len; ++p) {
          out[p] = static_cast<scalar_t>(static_cast<double>(row[p]) * inv_d[p] * wc);
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
                   const at::Tensor& inv_d_in, const at::Tensor& c_in, at::Tensor& dx,
                   at::Tensor& dw) {
  const int64_t outer = x.size(0), C = x.size(1), inner = x.size(2);
  if (inner == 1) {
    backward_rows<scalar_t>(x, g, w, inv_d_in, c_in, dx, dw);
    return;
  }
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* gp = g.data_ptr<scalar_t>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  const double* inv_dp = inv_d_in.data_ptr<double>();
  const double* cp = c_in.data_ptr<double>();
  const int threads = at::get_num_threads();
  // Per-thread partial sums of g x / d per channel (the scale's gradient).
  std::vector<double> partial(static_cast<size_t>(threads) * C, 0.0);
  at::parallel_for(0, block_count(outer, inner), 1, [&](int64_t b0, int64_t b1) {
    double ip[kBlock];
    double k[kBlock];
    double t[kBlock];
    double* dw_part = partial.data() + static_cast<size_t>(at::get_thread_num()) * C;
    for (int64_t b = b0; b < b1; ++b) {
      const Block blk = block_of(b, inner);
      const int64_t base = blk.outer * C * inner + blk.start;
      const double* inv_d = inv_dp + blk.outer * inner + blk.start;
      const double* c = cp + blk.outer * inner + blk.start;
      std::fill(ip, ip + blk.len, 0.0);
      for (int64_t ch = 0; ch < C; ++ch) {
        const scalar_t* xr = xp + base + ch * inner;
        const scalar_t* gr = gp + base + ch * inner;
        const double wc = w[ch];
        for (int64_t p = 0; p < blk.len; ++p) {
          const double gx = static_cast<double>(gr[p]) * static_cast<double>(xr[p]);
          ip[p] += wc * gx;
          t[p] = gx * inv_d[p];
        }
        dw_part[ch] += lane_sum(t, blk.len);
      }
      for (int64_t p = 0; p < blk.len; ++p) k[p] = c[p] * ip[p] * inv_d[p];
      for (int64_t ch = 0; ch < C; ++ch) {
        const scalar_t* xr = xp + base + ch * inner;
        const scalar_t* gr = gp + base + ch * inner;
        scalar_t* out = dxp + base + ch * inner;
        const double wc = w[ch];
        for (int64_t p = 0; p < blk.len; ++p) {
          const double v = (wc * static_cast<double>(gr[p]) - k[p] * static_cast<double>(xr[p])) *
                           inv_d[p];
          out[p] = static_cast<scalar_t>(v);
        }
      }
    }
  });
  sum_partials(partial, threads, C, dw);
}
