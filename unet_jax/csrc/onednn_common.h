// What the oneDNN handlers share: one CPU engine and stream, and one lock.

#ifndef UNET_JAX_CSRC_ONEDNN_COMMON_H_
#define UNET_JAX_CSRC_ONEDNN_COMMON_H_

#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
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
// And the scratchpad is the caller's (ScratchpadBuffer below).
inline const dnnl::primitive_attr& Strict() {
  static const dnnl::primitive_attr attr = [] {
    dnnl::primitive_attr strict;
    strict.set_fpmath_mode(dnnl::fpmath_mode::strict);
    strict.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    return strict;
  }();
  return attr;
}

inline dnnl::stream& Stream() {
  static dnnl::stream stream(Engine());
  return stream;
}

// XLA runs independent thunks on several threads at once, and the primitives
// share one scratchpad (ScratchpadBuffer below): two branches running at once (a
// TTA flip, the kernel gradients of two layers of one shape) would corrupt
// each other. One primitive at a time, each on all cores (OpenMP), loses
// nothing.
inline std::mutex& ExecutionMutex() {
  static std::mutex mutex;
  return mutex;
}

// The scratchpad buffer, of `bytes` at least: one that every primitive shares, grown to the
// largest need, since they run one at a time (the caller holds ExecutionMutex). Growing it
// frees the old one, so a call asks once for what all its primitives need. oneDNN's own
// scratchpad is per thread, sized on the thread that created the primitive, and XLA runs a
// custom call on any of its threads: there a kernel wrote through a null one (the gemm
// convolution of dilated kernels crashed at random steps).
inline void* ScratchpadBuffer(size_t bytes) {
  static std::unique_ptr<void, decltype(&std::free)> buffer(nullptr, &std::free);
  static size_t size = 0;
  if (bytes > size) {
    const size_t rounded = (bytes + 4095) / 4096 * 4096;
    void* grown = std::aligned_alloc(4096, rounded);
    if (grown == nullptr) throw std::bad_alloc();  // The old buffer stays.
    buffer.reset(grown);
    size = rounded;
  }
  return buffer.get();
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
