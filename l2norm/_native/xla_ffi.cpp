// The kernel of kernel.h as XLA custom calls (JAX on the CPU, through jax.ffi). Built only
// where JAX is installed: it needs the XLA FFI headers jaxlib ships.
//
// The attributes are kernel.h's Params, field for field by name, but `outer`
// (l2norm._native.xla_attributes writes them): x is any array whose trailing dimensions
// are (C, inner), so the leading batch dimension vmap adds (vmap_method="expand_dims")
// folds into `outer`, which ReadCall takes from x's size. The scale arrives as float32
// (JAX has no float64 without jax_enable_x64). Under vmap the scale's gradient comes out
// per batch entry (C entries each), and a vmapped scale holds one scale per batch entry:
// the kernel runs once per entry then.
#include <string>
#include <type_traits>
#include <vector>

#include "kernel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One custom call as the kernel runs it: `groups` batch entries (1 without vmap), each
// with its scale (or one shared scale).
struct Call {
  l2norm::Params params;  // of one group
  int64_t groups;
  int64_t stride;  // between the groups' scales: 0 when one scale serves them all
};

// The one place the handlers read their attributes: the Params of one group, from the
// attributes and x's size. `scale_size` is the scale operand's size, `gradient_size` the
// backward's scale gradient's (C per group), 0 in the forward: there the groups are the
// scale's, or 1 with no scale (x's groups then fold into `outer`).
ffi::Error ReadCall(const ffi::Dictionary& attrs, const ffi::AnyBuffer& x, int64_t scale_size,
                    int64_t gradient_size, Call* out) {
  l2norm::Params p{};
  ffi::Error error = ffi::Error::Success();
  auto read = [&](const char* name, auto* field) {
    using T = std::remove_pointer_t<decltype(field)>;
    if (error.failure()) return;
    ffi::ErrorOr<T> value = attrs.get<T>(name);
    if (value.has_error()) {
      error = ffi::Error::InvalidArgument(std::string("l2norm: attribute ") + name + ": " +
                                          value.error().message());
    } else {
      *field = *value;
    }
  };
  read("C", &p.shape.C);
  read("inner", &p.shape.inner);
  read("eps", &p.eps);
  read("scale", &p.scale);
  read("is_add", &p.is_add);
  read("power", &p.power);
  read("mean", &p.mean);
  read("threads", &p.threads);
  if (error.failure()) return error;
  if (!l2norm::valid(p)) {  // outer is still 0, which is valid
    return ffi::Error::InvalidArgument("l2norm: parameters the kernel does not take");
  }
  const int64_t per = l2norm::scale_entries(p);
  int64_t groups = p.shape.C > 0 ? gradient_size / p.shape.C : 0;
  if (gradient_size == 0) groups = per == 0 ? 1 : std::max<int64_t>(1, scale_size / per);
  const int64_t total = static_cast<int64_t>(x.element_count());
  const int64_t group_size = p.shape.C * p.shape.inner * groups;
  const bool shared = scale_size == per, each = scale_size == per * groups;
  if (group_size <= 0 || !(shared || each) || total % group_size) {
    return ffi::Error::InvalidArgument("l2norm: operands do not match (C, inner)");
  }
  p.shape.outer = total / group_size;
  *out = {p, groups, shared ? 0 : per};
  return ffi::Error::Success();
}

// Each group's scale as the kernel takes it: per entries in double.
std::vector<double> ScaleOf(const Call& call, const float* w, int64_t group) {
  const int64_t per = l2norm::scale_entries(call.params);
  std::vector<double> scale(static_cast<size_t>(per));
  for (int64_t c = 0; c < per; ++c) scale[c] = w[group * call.stride + c];
  return scale;
}

template <typename E>
void ForwardGroups(const Call& call, const void* x, const float* w, void* y) {
  using T = typename E::T;
  const l2norm::Shape& s = call.params.shape;
  const int64_t step = s.outer * s.C * s.inner;
  for (int64_t k = 0; k < call.groups; ++k) {
    l2norm::forward<E>(call.params, static_cast<const T*>(x) + k * step,
                       ScaleOf(call, w, k).data(), static_cast<T*>(y) + k * step);
  }
}

template <typename E>
void BackwardGroups(const Call& call, const void* x, const void* g, const float* w, void* dx,
                    float* dw) {
  using T = typename E::T;
  const l2norm::Shape& s = call.params.shape;
  const int64_t step = s.outer * s.C * s.inner;
  std::vector<double> sums(static_cast<size_t>(s.C));
  for (int64_t k = 0; k < call.groups; ++k) {
    l2norm::backward<E>(call.params, static_cast<const T*>(x) + k * step,
                        static_cast<const T*>(g) + k * step, ScaleOf(call, w, k).data(),
                        static_cast<T*>(dx) + k * step, sums.data());
    for (int64_t c = 0; c < s.C; ++c) dw[k * s.C + c] = static_cast<float>(sums[c]);
  }
}

// Calls kernel(E{}) with E the element type of x.
template <typename Kernel>
ffi::Error Dispatch(ffi::DataType dtype, Kernel kernel) {
  switch (dtype) {
    case ffi::DataType::F32:
      kernel(l2norm::Float32{});
      return ffi::Error::Success();
    case ffi::DataType::F16:
      kernel(l2norm::Float16{});
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      kernel(l2norm::BFloat16{});
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("l2norm: float32, float16 or bfloat16 only");
  }
}

ffi::Error ForwardImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> w, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Dictionary attrs) {
  Call call;
  const int64_t scale_size = static_cast<int64_t>(w.element_count());
  if (ffi::Error err = ReadCall(attrs, x, scale_size, 0, &call); err.failure()) return err;
  return Dispatch(x.element_type(), [&](auto e) {
    ForwardGroups<decltype(e)>(call, x.untyped_data(), w.typed_data(), y->untyped_data());
  });
}

ffi::Error BackwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::Buffer<ffi::F32> w,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::Buffer<ffi::F32>> dw,
                        ffi::Dictionary attrs) {
  Call call;
  const int64_t scale_size = static_cast<int64_t>(w.element_count());
  const int64_t gradient_size = static_cast<int64_t>(dw->element_count());
  if (ffi::Error err = ReadCall(attrs, x, scale_size, gradient_size, &call); err.failure()) {
    return err;
  }
  return Dispatch(x.element_type(), [&](auto e) {
    BackwardGroups<decltype(e)>(call, x.untyped_data(), g.untyped_data(), w.typed_data(),
                                dx->untyped_data(), dw->typed_data());
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(L2NormForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attrs());

XLA_FFI_DEFINE_HANDLER_SYMBOL(L2NormBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attrs());
