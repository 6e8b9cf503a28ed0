// What the oneDNN handlers share: one CPU engine and stream, and one lock.

#ifndef UNET_JAX_CSRC_ONEDNN_COMMON_H_
#define UNET_JAX_CSRC_ONEDNN_COMMON_H_

#include <exception>
#include <mutex>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace unet_onednn {

using Desc = dnnl::memory::desc;
using Tag = dnnl::memory::format_tag;
constexpr auto kF32 = dnnl::memory::data_type::f32;

// The oneDNN type of a float32 or bfloat16 XLA buffer; false for any other.
inline bool OnednnType(xla::ffi::DataType type, dnnl::memory::data_type* out) {
  if (type == xla::ffi::DataType::F32) {
    *out = kF32;
  } else if (type == xla::ffi::DataType::BF16) {
    *out = dnnl::memory::data_type::bf16;
  } else {
    return false;
  }
  return true;
}

inline dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Float32 computed as float32 whatever ONEDNN_DEFAULT_FPMATH_MODE says: set to bf16 or any,
// it would let oneDNN round float32 layers to bfloat16 on CPUs with such kernels, silently.
inline const dnnl::primitive_attr& Strict() {
  static const dnnl::primitive_attr attr = [] {
    dnnl::primitive_attr strict;
    strict.set_fpmath_mode(dnnl::fpmath_mode::strict);
    return strict;
  }();
  return attr;
}

inline dnnl::stream& Stream() {
  static dnnl::stream stream(Engine());
  return stream;
}

// XLA runs independent thunks on several threads at once, and a primitive
// owns one scratchpad: two branches running the same cached primitive (a
// TTA flip, the kernel gradients of two layers of one shape) corrupted each
// other. One primitive at a time, each on all cores (OpenMP), loses nothing.
inline std::mutex& ExecutionMutex() {
  static std::mutex mutex;
  return mutex;
}

// Runs `body`, turning an exception into an error XLA reports, named `name`.
template <typename Body>
xla::ffi::Error Guarded(const char* name, Body&& body) {
  try {
    body();
  } catch (const dnnl::error& e) {
    return xla::ffi::Error::Internal(std::string(name) + ": oneDNN error: " + e.what() +
                                     " (status " + std::to_string(e.status) + ")");
  } catch (const std::exception& e) {
    return xla::ffi::Error::Internal(std::string(name) + ": " + e.what());
  }
  return xla::ffi::Error::Success();
}

}  // namespace unet_onednn

#endif  // UNET_JAX_CSRC_ONEDNN_COMMON_H_
