// oneDNN batch normalisation in training mode as XLA FFI handlers (CPU; float32 or
// bfloat16 activations, float32 per-channel buffers); see unet_jax/onednn.py.
//
// Statistics over N, H and W of an NHWC tensor (biased variance, as flax's):
//   unet_onednn_batch_norm_fwd: (x, scale, shift) -> (y, mean, variance)
//   unet_onednn_batch_norm_bwd: (x, mean, variance, dy, scale) -> (dx, dscale, dshift)
// Primitives are cached by shape, activation type and epsilon.

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "onednn_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace unet_onednn;  // NOLINT: Engine, Desc, Tag, kF32, OnednnType shared.
const auto kFlags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;

using Key = std::tuple<bool, int64_t, int64_t, int64_t, int64_t, dnnl::memory::data_type, float>;

struct Plan {
  dnnl::primitive primitive;
  Desc data, channels, scratchpad;
};

std::shared_ptr<const Plan> GetPlan(bool backward, int64_t n, int64_t h, int64_t w, int64_t c,
                                    dnnl::memory::data_type type, float epsilon) {
  static std::mutex mutex;
  static std::map<Key, std::shared_ptr<const Plan>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& plan = cache[Key{backward, n, h, w, c, type, epsilon}];
  if (plan) return plan;
  auto made = std::make_shared<Plan>();
  made->data = Desc({n, c, h, w}, type, Tag::nhwc);
  made->channels = Desc({c}, kF32, Tag::a);
  dnnl::batch_normalization_forward::primitive_desc fwd(
      Engine(), dnnl::prop_kind::forward_training, made->data, made->data, epsilon, kFlags,
      unet_onednn::Strict());
  if (backward) {
    dnnl::batch_normalization_backward::primitive_desc bwd(
        Engine(), dnnl::prop_kind::backward, made->data, made->data, made->data, epsilon, kFlags,
        fwd, unet_onednn::Strict());
    made->primitive = dnnl::batch_normalization_backward(bwd);
    made->scratchpad = bwd.scratchpad_desc();
  } else {
    made->primitive = dnnl::batch_normalization_forward(fwd);
    made->scratchpad = fwd.scratchpad_desc();
  }
  plan = made;
  return plan;
}

// `types`: the element types of the activation buffers, which must agree.
ffi::Error Run(bool backward, ffi::Span<const int64_t> dims,
               std::initializer_list<ffi::DataType> types, float epsilon,
               const std::unordered_map<int, void*>& buffers) {
  if (dims[0] * dims[1] * dims[2] * dims[3] == 0) {
    return ffi::Error::InvalidArgument("onednn_batch_norm: zero-sized dimension");
  }
  dnnl::memory::data_type type;
  const ffi::DataType first = *types.begin();
  for (ffi::DataType each : types) {
    if (each != first || !OnednnType(each, &type)) {
      return ffi::Error::InvalidArgument(
          "onednn_batch_norm: activations must all be float32 or all bfloat16");
    }
  }
  return unet_onednn::Guarded("onednn_batch_norm", [&] {
    auto plan = GetPlan(backward, dims[0], dims[1], dims[2], dims[3], type, epsilon);
    std::unordered_map<int, dnnl::memory> args;
    for (const auto& [arg, data] : buffers) {
      const bool per_channel = arg != DNNL_ARG_SRC && arg != DNNL_ARG_DST &&
                               arg != DNNL_ARG_DIFF_SRC && arg != DNNL_ARG_DIFF_DST;
      args.emplace(arg, dnnl::memory(per_channel ? plan->channels : plan->data, Engine(), data));
    }
    std::lock_guard<std::mutex> lock(unet_onednn::ExecutionMutex());
    args.emplace(DNNL_ARG_SCRATCHPAD,
                 dnnl::memory(plan->scratchpad, Engine(),
                              unet_onednn::ScratchpadBuffer(plan->scratchpad.get_size())));
    plan->primitive.execute(unet_onednn::Stream(), args);
    unet_onednn::Stream().wait();
  });
}

using Data = ffi::AnyBuffer;
using Channels = ffi::Buffer<ffi::F32, 1>;
using DataOut = ffi::Result<ffi::AnyBuffer>;
using ChannelsOut = ffi::ResultBuffer<ffi::F32, 1>;

// NHWC `data`, every other data buffer of its shape, every channel buffer of its C.
bool Fits(ffi::Span<const int64_t> data, std::initializer_list<ffi::Span<const int64_t>> alike,
          std::initializer_list<int64_t> channel_sizes) {
  if (data.size() != 4) return false;
  for (ffi::Span<const int64_t> other : alike) {
    if (!std::equal(data.begin(), data.end(), other.begin(), other.end())) return false;
  }
  for (int64_t size : channel_sizes) {
    if (size != data[3]) return false;
  }
  return true;
}

ffi::Error BatchNormFwd(Data x, Channels scale, Channels shift, DataOut y, ChannelsOut mean,
                        ChannelsOut variance, float epsilon) {
  if (!Fits(x.dimensions(), {y->dimensions()},
            {scale.element_count(), shift.element_count(), mean->element_count(),
             variance->element_count()})) {
    return ffi::Error::InvalidArgument(
        "onednn_batch_norm_fwd: shapes or channel counts disagree");
  }
  return Run(false, x.dimensions(), {x.element_type(), y->element_type()}, epsilon,
             {{DNNL_ARG_SRC, x.untyped_data()}, {DNNL_ARG_SCALE, scale.untyped_data()},
              {DNNL_ARG_SHIFT, shift.untyped_data()}, {DNNL_ARG_DST, y->untyped_data()},
              {DNNL_ARG_MEAN, mean->untyped_data()},
              {DNNL_ARG_VARIANCE, variance->untyped_data()}});
}

ffi::Error BatchNormBwd(Data x, Channels mean, Channels variance, Data dy, Channels scale,
                        DataOut dx, ChannelsOut dscale, ChannelsOut dshift, float epsilon) {
  if (!Fits(x.dimensions(), {dy.dimensions(), dx->dimensions()},
            {mean.element_count(), variance.element_count(), scale.element_count(),
             dscale->element_count(), dshift->element_count()})) {
    return ffi::Error::InvalidArgument(
        "onednn_batch_norm_bwd: shapes or channel counts disagree");
  }
  return Run(true, x.dimensions(), {x.element_type(), dy.element_type(), dx->element_type()},
             epsilon,
             {{DNNL_ARG_SRC, x.untyped_data()}, {DNNL_ARG_MEAN, mean.untyped_data()},
              {DNNL_ARG_VARIANCE, variance.untyped_data()},
              {DNNL_ARG_DIFF_DST, dy.untyped_data()}, {DNNL_ARG_SCALE, scale.untyped_data()},
              {DNNL_ARG_DIFF_SRC, dx->untyped_data()},
              {DNNL_ARG_DIFF_SCALE, dscale->untyped_data()},
              {DNNL_ARG_DIFF_SHIFT, dshift->untyped_data()}});
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetOnednnBatchNormFwd, BatchNormFwd,
                              ffi::Ffi::Bind().Arg<Data>().Arg<Channels>().Arg<Channels>()
                                  .Ret<Data>().Ret<Channels>().Ret<Channels>()
                                  .Attr<float>("epsilon"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetOnednnBatchNormBwd, BatchNormBwd,
                              ffi::Ffi::Bind().Arg<Data>().Arg<Channels>().Arg<Channels>()
                                  .Arg<Data>().Arg<Channels>().Ret<Data>().Ret<Channels>()
                                  .Ret<Channels>().Attr<float>("epsilon"));
