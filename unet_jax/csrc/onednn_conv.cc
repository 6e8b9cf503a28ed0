// oneDNN 2-D convolutions as XLA FFI handlers (CPU; float32 or bfloat16 buffers); see
// unet_jax/onednn.py.
//
// Stride 1, "SAME" padding (XLA's split: an odd pixel goes to the end), dilation
// >= 1, no bias. Activations NHWC, kernel HWIO:
//   unet_onednn_conv_fwd:         (x, w)  -> y
//   unet_onednn_conv_bwd_data:    (dy, w) -> dx
//   unet_onednn_conv_bwd_weights: (x, dy) -> dw
// Activations stay NHWC, so they are never reordered (blocked layouts were
// slower once their reorders were counted); the kernel takes the layout the
// primitive prefers and is reordered from or to HWIO on each call (small).
// Primitives are cached by shape and element types: creating one costs more than
// running it. bfloat16 buffers run on the CPU's bfloat16 instructions (AMX,
// AVX512-BF16) where it has them.

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "onednn_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace unet_onednn;  // NOLINT: Engine, Desc, Tag, kF32, OnednnType shared.

enum Kind : int64_t { kFwd, kBwdData, kBwdWeights };

struct Geometry {
  int64_t n, h, w, cin, cout, kh, kw, dilation;
};

// One tensor of a primitive: its layout in XLA's buffer (`user`), the layout
// the primitive wants (`prim`) and the reorder between them when they differ.
struct Operand {
  int arg;
  Desc user, prim;
  bool output;
  dnnl::reorder reorder;  // user -> prim for inputs, prim -> user for outputs.
  Desc reorder_scratchpad;
};

struct Plan {
  dnnl::primitive primitive;
  bool reference;  // oneDNN's reference kernel (UnetOnednnConvIsOptimised).
  Desc scratchpad;
  size_t scratchpad_bytes;  // The most that it or a reorder of its operands needs.
  std::vector<Operand> operands;  // In the order of the handler's buffers.
};

Operand MakeOperand(int arg, const Desc& user, const Desc& prim, bool output) {
  Operand op{arg, user, prim, output, dnnl::reorder(), Desc()};
  if (user != prim) {
    const Desc& from = output ? prim : user;
    const Desc& to = output ? user : prim;
    dnnl::reorder::primitive_desc reorder(Engine(), from, Engine(), to, unet_onednn::Strict());
    op.reorder = dnnl::reorder(reorder);
    op.reorder_scratchpad = reorder.scratchpad_desc();
  }
  return op;
}

void Reorder(const Operand& op, const dnnl::memory& from, const dnnl::memory& to,
             void* scratchpad) {
  op.reorder.execute(unet_onednn::Stream(),
                     {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                      {DNNL_ARG_SCRATCHPAD, dnnl::memory(op.reorder_scratchpad, Engine(),
                                                         scratchpad)}});
}

// Element types of the handler's three buffers, in their order.
using Types = std::array<dnnl::memory::data_type, 3>;

std::shared_ptr<const Plan> CreatePlan(Kind kind, const Geometry& g, const Types& types) {
  const auto& engine = Engine();
  // Which buffer holds the convolution's source, weights and destination (or their gradients).
  const int src_at = kind == kBwdData ? 2 : 0;
  const int weights_at = kind == kBwdWeights ? 2 : 1;
  const int dst_at = kind == kFwd ? 2 : (kind == kBwdData ? 0 : 1);
  const Desc src({g.n, g.cin, g.h, g.w}, types[src_at], Tag::nhwc);
  const Desc dst({g.n, g.cout, g.h, g.w}, types[dst_at], Tag::nhwc);
  const Desc hwio({g.cout, g.cin, g.kh, g.kw}, types[weights_at], Tag::hwio);
  const Desc any_weights({g.cout, g.cin, g.kh, g.kw}, types[weights_at], Tag::any);
  // oneDNN counts dilation from 0: 0 is a dense kernel.
  const dnnl::memory::dims strides{1, 1}, dilates{g.dilation - 1, g.dilation - 1};
  const int64_t pad_h = (g.kh - 1) * g.dilation, pad_w = (g.kw - 1) * g.dilation;
  const dnnl::memory::dims pad_l{pad_h / 2, pad_w / 2};
  const dnnl::memory::dims pad_r{pad_h - pad_h / 2, pad_w - pad_w / 2};
  const auto algo = dnnl::algorithm::convolution_direct;

  dnnl::convolution_forward::primitive_desc fwd(engine, dnnl::prop_kind::forward_training, algo,
                                                src, any_weights, dst, strides, dilates, pad_l,
                                                pad_r, unet_onednn::Strict());
  auto plan = std::make_shared<Plan>();
  const auto is_reference = [](const dnnl::primitive_desc_base& pd) {
    return std::string(pd.impl_info_str()).find("ref") != std::string::npos;
  };
  if (kind == kFwd) {
    plan->reference = is_reference(fwd);
    plan->primitive = dnnl::convolution_forward(fwd);
    plan->scratchpad = fwd.scratchpad_desc();
    plan->operands = {MakeOperand(DNNL_ARG_SRC, src, fwd.src_desc(), false),
                      MakeOperand(DNNL_ARG_WEIGHTS, hwio, fwd.weights_desc(), false),
                      MakeOperand(DNNL_ARG_DST, dst, fwd.dst_desc(), true)};
  } else if (kind == kBwdData) {
    dnnl::convolution_backward_data::primitive_desc bwd(engine, algo, src, any_weights, dst,
                                                        strides, dilates, pad_l, pad_r, fwd,
                                                        unet_onednn::Strict());
    plan->reference = is_reference(bwd);
    plan->primitive = dnnl::convolution_backward_data(bwd);
    plan->scratchpad = bwd.scratchpad_desc();
    plan->operands = {MakeOperand(DNNL_ARG_DIFF_DST, dst, bwd.diff_dst_desc(), false),
                      MakeOperand(DNNL_ARG_WEIGHTS, hwio, bwd.weights_desc(), false),
                      MakeOperand(DNNL_ARG_DIFF_SRC, src, bwd.diff_src_desc(), true)};
  } else {
    dnnl::convolution_backward_weights::primitive_desc bwd(engine, algo, src, any_weights, dst,
                                                           strides, dilates, pad_l, pad_r, fwd,
                                                           unet_onednn::Strict());
    plan->reference = is_reference(bwd);
    plan->primitive = dnnl::convolution_backward_weights(bwd);
    plan->scratchpad = bwd.scratchpad_desc();
    plan->operands = {MakeOperand(DNNL_ARG_SRC, src, bwd.src_desc(), false),
                      MakeOperand(DNNL_ARG_DIFF_DST, dst, bwd.diff_dst_desc(), false),
                      MakeOperand(DNNL_ARG_DIFF_WEIGHTS, hwio, bwd.diff_weights_desc(), true)};
  }
  plan->scratchpad_bytes = plan->scratchpad.get_size();
  for (const Operand& op : plan->operands) {
    plan->scratchpad_bytes = std::max(plan->scratchpad_bytes, op.reorder_scratchpad.get_size());
  }
  return plan;
}

std::shared_ptr<const Plan> GetPlan(Kind kind, const Geometry& g, const Types& types) {
  static std::mutex mutex;
  static std::map<std::array<int64_t, 12>, std::shared_ptr<const Plan>> cache;
  const std::array<int64_t, 12> key{kind, g.n, g.h, g.w, g.cin, g.cout, g.kh, g.kw, g.dilation,
                                    static_cast<int64_t>(types[0]),
                                    static_cast<int64_t>(types[1]),
                                    static_cast<int64_t>(types[2])};
  std::lock_guard<std::mutex> lock(mutex);
  auto& plan = cache[key];
  if (!plan) plan = CreatePlan(kind, g, types);
  return plan;
}

void Execute(const Plan& plan, const std::array<void*, 3>& buffers) {
  std::lock_guard<std::mutex> lock(unet_onednn::ExecutionMutex());
  const auto& engine = Engine();
  auto& stream = unet_onednn::Stream();
  void* scratchpad = unet_onednn::ScratchpadBuffer(plan.scratchpad_bytes);
  std::unordered_map<int, dnnl::memory> args;
  std::vector<std::pair<const Operand*, dnnl::memory>> write_back;
  for (size_t i = 0; i < plan.operands.size(); ++i) {
    const Operand& op = plan.operands[i];
    dnnl::memory user(op.user, engine, buffers[i]);
    if (op.user == op.prim) {
      args.emplace(op.arg, user);
      continue;
    }
    dnnl::memory reordered(op.prim, engine);
    if (op.output) {
      write_back.emplace_back(&op, user);
    } else {
      Reorder(op, user, reordered, scratchpad);
    }
    args.emplace(op.arg, reordered);
  }
  args.emplace(DNNL_ARG_SCRATCHPAD, dnnl::memory(plan.scratchpad, engine, scratchpad));
  plan.primitive.execute(stream, args);
  for (auto& [op, user] : write_back) Reorder(*op, args.at(op->arg), user, scratchpad);
  stream.wait();
}

using Input = ffi::AnyBuffer;
using Output = ffi::Result<ffi::AnyBuffer>;

ffi::Error Run(Kind kind, const Geometry& g, const std::array<ffi::DataType, 3>& element_types,
               const std::array<void*, 3>& buffers) {
  if (g.dilation < 1) return ffi::Error::InvalidArgument("onednn_conv: dilation must be >= 1");
  if (g.n * g.h * g.w * g.cin * g.cout * g.kh * g.kw == 0) {
    return ffi::Error::InvalidArgument("onednn_conv: zero-sized dimension");
  }
  Types types;
  for (int i = 0; i < 3; ++i) {
    if (!OnednnType(element_types[i], &types[i])) {
      return ffi::Error::InvalidArgument("onednn_conv: buffers must be float32 or bfloat16");
    }
  }
  return unet_onednn::Guarded("onednn_conv",
                              [&] { Execute(*GetPlan(kind, g, types), buffers); });
}

bool FourDims(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b,
              ffi::Span<const int64_t> c) {
  return a.size() == 4 && b.size() == 4 && c.size() == 4;
}

bool SameNhw(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  return a[0] == b[0] && a[1] == b[1] && a[2] == b[2];
}

ffi::Error ConvFwd(Input x, Input w, Output y, int64_t dilation) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (!FourDims(xd, wd, yd) || xd[3] != wd[2] || !SameNhw(xd, yd) || yd[3] != wd[3]) {
    return ffi::Error::InvalidArgument("onednn_conv_fwd: shapes of x (NHWC), w (HWIO), y disagree");
  }
  Geometry g{xd[0], xd[1], xd[2], wd[2], wd[3], wd[0], wd[1], dilation};
  return Run(kFwd, g, {x.element_type(), w.element_type(), y->element_type()},
             {x.untyped_data(), w.untyped_data(), y->untyped_data()});
}

ffi::Error ConvBwdData(Input dy, Input w, Output dx, int64_t dilation) {
  auto dyd = dy.dimensions(), wd = w.dimensions(), dxd = dx->dimensions();
  if (!FourDims(dyd, wd, dxd) || dyd[3] != wd[3] || !SameNhw(dyd, dxd) || dxd[3] != wd[2]) {
    return ffi::Error::InvalidArgument(
        "onednn_conv_bwd_data: shapes of dy (NHWC), w (HWIO), dx disagree");
  }
  Geometry g{dxd[0], dxd[1], dxd[2], wd[2], wd[3], wd[0], wd[1], dilation};
  return Run(kBwdData, g, {dy.element_type(), w.element_type(), dx->element_type()},
             {dy.untyped_data(), w.untyped_data(), dx->untyped_data()});
}

ffi::Error ConvBwdWeights(Input x, Input dy, Output dw, int64_t dilation) {
  auto xd = x.dimensions(), dyd = dy.dimensions(), dwd = dw->dimensions();
  if (!FourDims(xd, dyd, dwd) || !SameNhw(xd, dyd) || dwd[2] != xd[3] || dwd[3] != dyd[3]) {
    return ffi::Error::InvalidArgument(
        "onednn_conv_bwd_weights: shapes of x (NHWC), dy (NHWC), dw (HWIO) disagree");
  }
  Geometry g{xd[0], xd[1], xd[2], xd[3], dyd[3], dwd[0], dwd[1], dilation};
  return Run(kBwdWeights, g, {x.element_type(), dy.element_type(), dw->element_type()},
             {x.untyped_data(), dy.untyped_data(), dw->untyped_data()});
}

}  // namespace

// 1 when oneDNN has an optimised kernel for this convolution (`kind` as Kind, buffers
// float32 or, with `bfloat16`, bfloat16), else 0: its reference kernel ran a dilated
// kernel's gradient on an 800x800 image 20-100x slower than XLA. Asked at trace time, so
// the primitive is also created (and cached) before the first step.
extern "C" int UnetOnednnConvIsOptimised(int64_t kind, int64_t n, int64_t h, int64_t w,
                                         int64_t cin, int64_t cout, int64_t kh, int64_t kw,
                                         int64_t dilation, int64_t bfloat16) {
  const auto type = bfloat16 ? dnnl::memory::data_type::bf16 : kF32;
  try {
    return GetPlan(static_cast<Kind>(kind), Geometry{n, h, w, cin, cout, kh, kw, dilation},
                   Types{type, type, type})->reference ? 0 : 1;
  } catch (const std::exception&) {
    return 0;  // No primitive for it: XLA's convolution instead of an error at run time.
  }
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetOnednnConvFwd, ConvFwd,
                              ffi::Ffi::Bind().Arg<Input>().Arg<Input>().Ret<Input>()
                                  .Attr<int64_t>("dilation"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetOnednnConvBwdData, ConvBwdData,
                              ffi::Ffi::Bind().Arg<Input>().Arg<Input>().Ret<Input>()
                                  .Attr<int64_t>("dilation"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetOnednnConvBwdWeights, ConvBwdWeights,
                              ffi::Ffi::Bind().Arg<Input>().Arg<Input>().Ret<Input>()
                                  .Attr<int64_t>("dilation"));
