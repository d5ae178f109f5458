// The kernel of kernel.h as XLA custom calls (JAX on the CPU, through jax.ffi). Built only
// where JAX is installed: it needs the XLA FFI headers jaxlib ships.
//
// x is any array whose trailing dimensions are (channels, inner) (attributes), so the
// leading batch dimension vmap adds (vmap_method="expand_dims") folds into `outer`. The
// scale arrives as float32 (JAX has no float64 without jax_enable_x64), scale_kind saying
// how many entries it has (0 none, 1 shared, 2 one per channel). Under vmap the scale's
// gradient comes out per batch entry (C entries each), and a vmapped scale holds one
// scale per batch entry: the kernel runs once per entry then.
#include <string>
#include <vector>

#include "kernel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Groups {
  l2norm::Shape shape;  // of one group
  int64_t count;        // groups
  int64_t per;          // scale entries per group
  int64_t stride;       // between the groups' scales: 0 when one scale serves them all
};

// `groups` batch entries (1 without vmap), each with its scale (or one shared scale).
ffi::Error Split(const ffi::AnyBuffer& x, int64_t scale_entries, int64_t groups,
                 int64_t channels, int64_t inner, int64_t scale_kind, Groups* out) {
  const int64_t total = static_cast<int64_t>(x.element_count());
  const int64_t per = scale_kind == 0 ? 0 : (scale_kind == 1 ? 1 : channels);
  const bool shared = scale_entries == per, each = scale_entries == per * groups;
  if (channels <= 0 || inner <= 0 || groups <= 0 || !(shared || each) ||
      total % (channels * inner * groups)) {
    return ffi::Error::InvalidArgument("l2norm: operands do not match (channels, inner)");
  }
  *out = {{total / (channels * inner * groups), channels, inner}, groups, per, shared ? 0 : per};
  return ffi::Error::Success();
}

template <typename E>
void ForwardGroups(const void* x, void* y, const float* w, const Groups& g,
                   const l2norm::Placement& pl, int threads) {
  const int64_t step = g.shape.outer * g.shape.C * g.shape.inner;
  std::vector<double> scale(static_cast<size_t>(g.per));
  for (int64_t k = 0; k < g.count; ++k) {
    for (int64_t c = 0; c < g.per; ++c) scale[c] = w[k * g.stride + c];
    l2norm::forward<E>(static_cast<const typename E::T*>(x) + k * step,
                       static_cast<typename E::T*>(y) + k * step, g.shape, scale.data(), g.per,
                       pl, threads);
  }
}

template <typename E>
void BackwardGroups(const void* x, const void* gr, void* dx, float* dw, const float* w,
                    const Groups& g, const l2norm::Placement& pl, int threads) {
  const int64_t step = g.shape.outer * g.shape.C * g.shape.inner;
  std::vector<double> scale(static_cast<size_t>(g.per)), sums(static_cast<size_t>(g.shape.C));
  for (int64_t k = 0; k < g.count; ++k) {
    for (int64_t c = 0; c < g.per; ++c) scale[c] = w[k * g.stride + c];
    l2norm::backward<E>(static_cast<const typename E::T*>(x) + k * step,
                        static_cast<const typename E::T*>(gr) + k * step,
                        static_cast<typename E::T*>(dx) + k * step, sums.data(), g.shape,
                        scale.data(), g.per, pl, threads);
    for (int64_t c = 0; c < g.shape.C; ++c) dw[k * g.shape.C + c] = static_cast<float>(sums[c]);
  }
}

ffi::Error ForwardImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> w, ffi::Result<ffi::AnyBuffer> y,
                       int64_t channels, int64_t inner, int64_t scale_kind, bool is_add,
                       int64_t power, double eps, int64_t threads) {
  Groups g;
  const int64_t entries = static_cast<int64_t>(w.element_count());
  const int64_t per = scale_kind == 0 ? 0 : (scale_kind == 1 ? 1 : channels);
  const int64_t groups = per == 0 ? 1 : std::max<int64_t>(1, entries / per);
  if (ffi::Error err = Split(x, entries, groups, channels, inner, scale_kind, &g);
      err.failure()) {
    return err;
  }
  const l2norm::Placement pl{is_add, static_cast<int>(power), eps};
  const int nt = static_cast<int>(threads);
  switch (x.element_type()) {
    case ffi::DataType::F32:
      ForwardGroups<l2norm::Float32>(x.untyped_data(), y->untyped_data(), w.typed_data(), g, pl,
                                     nt);
      break;
    case ffi::DataType::F16:
      ForwardGroups<l2norm::Float16>(x.untyped_data(), y->untyped_data(), w.typed_data(), g, pl,
                                     nt);
      break;
    case ffi::DataType::BF16:
      ForwardGroups<l2norm::BFloat16>(x.untyped_data(), y->untyped_data(), w.typed_data(), g,
                                      pl, nt);
      break;
    default:
      return ffi::Error::InvalidArgument("l2norm: float32, float16 or bfloat16 only");
  }
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer gr, ffi::Buffer<ffi::F32> w,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::Buffer<ffi::F32>> dw,
                        int64_t channels, int64_t inner, int64_t scale_kind, bool is_add,
                        int64_t power, double eps, int64_t threads) {
  Groups g;
  const int64_t entries = static_cast<int64_t>(w.element_count());
  const int64_t groups = static_cast<int64_t>(dw->element_count()) / std::max<int64_t>(channels, 1);
  if (ffi::Error err = Split(x, entries, groups, channels, inner, scale_kind, &g);
      err.failure()) {
    return err;
  }
  const l2norm::Placement pl{is_add, static_cast<int>(power), eps};
  const int nt = static_cast<int>(threads);
  float* dwp = dw->typed_data();
  switch (x.element_type()) {
    case ffi::DataType::F32:
      BackwardGroups<l2norm::Float32>(x.untyped_data(), gr.untyped_data(), dx->untyped_data(),
                                      dwp, w.typed_data(), g, pl, nt);
      break;
    case ffi::DataType::F16:
      BackwardGroups<l2norm::Float16>(x.untyped_data(), gr.untyped_data(), dx->untyped_data(),
                                      dwp, w.typed_data(), g, pl, nt);
      break;
    case ffi::DataType::BF16:
      BackwardGroups<l2norm::BFloat16>(x.untyped_data(), gr.untyped_data(), dx->untyped_data(),
                                       dwp, w.typed_data(), g, pl, nt);
      break;
    default:
      return ffi::Error::InvalidArgument("l2norm: float32, float16 or bfloat16 only");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(L2NormForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("channels")
                                  .Attr<int64_t>("inner")
                                  .Attr<int64_t>("scale_kind")
                                  .Attr<bool>("is_add")
                                  .Attr<int64_t>("power")
                                  .Attr<double>("eps")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(L2NormBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("channels")
                                  .Attr<int64_t>("inner")
                                  .Attr<int64_t>("scale_kind")
                                  .Attr<bool>("is_add")
                                  .Attr<int64_t>("power")
                                  .Attr<double>("eps")
                                  .Attr<int64_t>("threads"));
