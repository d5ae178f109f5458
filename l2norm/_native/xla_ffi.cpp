// The kernel of kernel.h as XLA custom calls (JAX on the CPU, through jax.ffi). Built only
// where JAX is installed: it needs the XLA FFI headers jaxlib ships.
//
// The operands are any array whose trailing dimensions are (C, inner) (attributes), so a
// leading batch dimension added by vmap folds into `outer`.
#include <string>

#include "kernel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error Shape(const ffi::AnyBuffer& x, int64_t channels, int64_t inner, l2norm::Shape* s) {
  const int64_t count = static_cast<int64_t>(x.element_count());
  if (channels <= 0 || inner <= 0 || count % (channels * inner) != 0) {
    return ffi::Error::InvalidArgument("l2norm: operand does not end in (channels, inner)");
  }
  *s = {count / (channels * inner), channels, inner};
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::F64> w, ffi::Result<ffi::AnyBuffer> y,
                       int64_t channels, int64_t inner, bool is_add, int64_t power, double eps,
                       int64_t threads) {
  l2norm::Shape s;
  if (ffi::Error err = Shape(x, channels, inner, &s); err.failure()) return err;
  const l2norm::Placement pl{is_add, static_cast<int>(power), eps};
  const int64_t w_len = static_cast<int64_t>(w.element_count());
  const int nt = static_cast<int>(threads);
  switch (x.element_type()) {
    case ffi::DataType::F32:
      l2norm::forward<l2norm::Float32>(static_cast<const float*>(x.untyped_data()),
                                       static_cast<float*>(y->untyped_data()), s, w.typed_data(),
                                       w_len, pl, nt);
      break;
    case ffi::DataType::F16:
      l2norm::forward<l2norm::Float16>(static_cast<const uint16_t*>(x.untyped_data()),
                                       static_cast<uint16_t*>(y->untyped_data()), s,
                                       w.typed_data(), w_len, pl, nt);
      break;
    case ffi::DataType::BF16:
      l2norm::forward<l2norm::BFloat16>(static_cast<const uint16_t*>(x.untyped_data()),
                                        static_cast<uint16_t*>(y->untyped_data()), s,
                                        w.typed_data(), w_len, pl, nt);
      break;
    default:
      return ffi::Error::InvalidArgument("l2norm: float32, float16 or bfloat16 only");
  }
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::Buffer<ffi::F64> w,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::Buffer<ffi::F64>> dw,
                        int64_t channels, int64_t inner, bool is_add, int64_t power,
                        double eps, int64_t threads) {
  l2norm::Shape s;
  if (ffi::Error err = Shape(x, channels, inner, &s); err.failure()) return err;
  const l2norm::Placement pl{is_add, static_cast<int>(power), eps};
  const int64_t w_len = static_cast<int64_t>(w.element_count());
  const int nt = static_cast<int>(threads);
  double* dwp = dw->typed_data();
  switch (x.element_type()) {
    case ffi::DataType::F32:
      l2norm::backward<l2norm::Float32>(static_cast<const float*>(x.untyped_data()),
                                        static_cast<const float*>(g.untyped_data()),
                                        static_cast<float*>(dx->untyped_data()), dwp, s,
                                        w.typed_data(), w_len, pl, nt);
      break;
    case ffi::DataType::F16:
      l2norm::backward<l2norm::Float16>(static_cast<const uint16_t*>(x.untyped_data()),
                                        static_cast<const uint16_t*>(g.untyped_data()),
                                        static_cast<uint16_t*>(dx->untyped_data()), dwp, s,
                                        w.typed_data(), w_len, pl, nt);
      break;
    case ffi::DataType::BF16:
      l2norm::backward<l2norm::BFloat16>(static_cast<const uint16_t*>(x.untyped_data()),
                                         static_cast<const uint16_t*>(g.untyped_data()),
                                         static_cast<uint16_t*>(dx->untyped_data()), dwp, s,
                                         w.typed_data(), w_len, pl, nt);
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
                                  .Arg<ffi::Buffer<ffi::F64>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("channels")
                                  .Attr<int64_t>("inner")
                                  .Attr<bool>("is_add")
                                  .Attr<int64_t>("power")
                                  .Attr<double>("eps")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(L2NormBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F64>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F64>>()
                                  .Attr<int64_t>("channels")
                                  .Attr<int64_t>("inner")
                                  .Attr<bool>("is_add")
                                  .Attr<int64_t>("power")
                                  .Attr<double>("eps")
                                  .Attr<int64_t>("threads"));
