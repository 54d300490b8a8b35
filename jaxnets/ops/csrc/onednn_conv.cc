// 2-D convolution (NHWC input, HWIO kernel, NHWC output, float32) as XLA FFI handlers over
// oneDNN: forward, input gradient ("backward data") and kernel gradient ("backward
// weights"), and two variants with a bias: the forward adding the bias and, optionally,
// applying a ReLU in the same pass (oneDNN post-op), and the kernel gradient that also
// returns the bias gradient (the sum of dy, computed while dy is read). jaxnets.ops.onednn
// loads this library, registers the handlers with jax.ffi and wraps them as differentiable
// JAX functions.
//
// Layouts: activations stay NHWC (oneDNN's "acdb"), which its direct convolutions read
// without a reorder; the kernel is reordered between HWIO and the blocked layout each
// primitive chooses (a few hundred KB at most, measured negligible).
//
// Primitives are built once per (shape, stride, padding) and cached. Calls are serialised
// by one mutex: oneDNN runs each call on its own OpenMP team over all cores, so two XLA
// threads calling at once would only oversubscribe the cores.
//
// Scratchpads are ours ("user" mode), one grow-only buffer shared by all primitives (calls
// are serialised). oneDNN's default "library" mode keeps a thread-local scratchpad, sized
// in the thread that created the primitive: XLA runs a custom call on whichever of its
// threads is free, and a primitive executed on another thread than its creator ran on that
// thread's scratchpad, smaller or absent (a segfault in the gemm-based kernel gradient of
// small layers, seen in the README's transfer example; tests/test_onednn.py keeps it).
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

std::mutex& Mutex() {
  static std::mutex mu;
  return mu;
}

dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

// One convolution problem: input (n, h, w, c), kernel (kh, kw, c, o), strides and
// (low, high) padding per axis. Output sizes follow floor((h + pt + pb - kh) / sh) + 1.
// bias: the forward adds a bias (o) and the kernel gradient returns its gradient too;
// relu: the forward applies max(0, .) to its result (with bias only).
struct Problem {
  int64_t n, h, w, c, kh, kw, o, sh, sw, pt, pb, pl, pr;
  bool bias = false, relu = false;
  int64_t oh() const { return (h + pt + pb - kh) / sh + 1; }
  int64_t ow() const { return (w + pl + pr - kw) / sw + 1; }
  auto key() const {
    return std::make_tuple(n, h, w, c, kh, kw, o, sh, sw, pt, pb, pl, pr, bias, relu);
  }
};

// Every primitive keeps its scratchpad in our buffer (see the top of the file).
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// The shared scratchpad (64-byte aligned). It grows only in Get, when a new problem's
// primitives are built, so no call frees it while a primitive uses it; callers hold the mutex.
struct Scratchpad {
  void* buf = nullptr;
  size_t size = 0;
  void Reserve(size_t bytes) {
    if (bytes <= size) return;
    std::free(buf);
    size = (bytes + 63) / 64 * 64;
    buf = std::aligned_alloc(64, size);
    if (buf == nullptr) {
      size = 0;
      throw dnnl::error(dnnl_out_of_memory, "could not allocate the convolution scratchpad");
    }
  }
};

Scratchpad& Scratch() {
  static Scratchpad pad;
  return pad;
}

// A primitive with its scratchpad layout, run with the shared scratchpad.
struct Step {
  dnnl::primitive prim;
  dnnl::memory::desc scratch;
  void Run(dnnl::stream& s, std::unordered_map<int, dnnl::memory> args) const {
    args.insert({DNNL_ARG_SCRATCHPAD, dnnl::memory(scratch, Engine(), Scratch().buf)});
    prim.execute(s, args);
  }
};

// A reorder between two kernel layouts (empty when they are the same).
Step MakeReorder(const dnnl::memory::desc& from, const dnnl::memory::desc& to) {
  if (from == to) return Step{};
  dnnl::reorder::primitive_desc pd(Engine(), from, Engine(), to, UserScratchpad());
  return Step{dnnl::reorder(pd), pd.scratchpad_desc()};
}

struct Primitives {
  dnnl::memory::desc src, wei, dst;             // the user's layouts: NHWC, HWIO, NHWC
  dnnl::memory::desc bias;                      // (o), when the problem has a bias
  dnnl::memory::desc wei_fwd, wei_bwd_data, wei_bwd_w;  // the layouts the primitives chose
  Step fwd, bwd_data, bwd_w;
  // HWIO -> the forward's and backward-data's kernel layouts; backward-weights' -> HWIO.
  Step to_fwd, to_bwd_data, from_bwd_w;
  // Kernel buffers in the chosen layouts, allocated once (calls are serialised).
  dnnl::memory k_fwd, k_bwd_data, k_bwd_w;
};

Primitives& Get(const Problem& p) {
  static std::map<decltype(p.key()), std::unique_ptr<Primitives>> cache;
  auto it = cache.find(p.key());
  if (it != cache.end()) return *it->second;
  auto q = std::make_unique<Primitives>();
  q->src = dnnl::memory::desc({p.n, p.c, p.h, p.w}, dt::f32, tag::nhwc);
  q->wei = dnnl::memory::desc({p.o, p.c, p.kh, p.kw}, dt::f32, tag::hwio);
  q->dst = dnnl::memory::desc({p.n, p.o, p.oh(), p.ow()}, dt::f32, tag::nhwc);
  dnnl::memory::desc any({p.o, p.c, p.kh, p.kw}, dt::f32, tag::any);
  dnnl::memory::dims strides{p.sh, p.sw}, lo{p.pt, p.pl}, hi{p.pb, p.pr};
  auto alg = dnnl::algorithm::convolution_direct;
  auto attr = UserScratchpad();
  auto prop = dnnl::prop_kind::forward_training;
  // The backward primitives are hinted by the forward without post-ops.
  dnnl::convolution_forward::primitive_desc hint;
  if (p.bias) {
    q->bias = dnnl::memory::desc({p.o}, dt::f32, tag::x);
    hint = dnnl::convolution_forward::primitive_desc(Engine(), prop, alg, q->src, any, q->bias,
                                                     q->dst, strides, lo, hi, attr);
  } else {
    hint = dnnl::convolution_forward::primitive_desc(Engine(), prop, alg, q->src, any, q->dst,
                                                     strides, lo, hi, attr);
  }
  dnnl::convolution_forward::primitive_desc fwd = hint;
  if (p.relu) {
    auto fused = UserScratchpad();
    dnnl::post_ops ops;
    ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    fused.set_post_ops(ops);
    fwd = dnnl::convolution_forward::primitive_desc(Engine(), prop, alg, q->src, any, q->bias,
                                                    q->dst, strides, lo, hi, fused);
  }
  dnnl::convolution_backward_data::primitive_desc bwd_data(Engine(), alg, q->src, any, q->dst,
                                                           strides, lo, hi, hint, attr);
  dnnl::convolution_backward_weights::primitive_desc bwd_w =
      p.bias ? dnnl::convolution_backward_weights::primitive_desc(
                   Engine(), alg, q->src, any, q->bias, q->dst, strides, lo, hi, hint, attr)
             : dnnl::convolution_backward_weights::primitive_desc(
                   Engine(), alg, q->src, any, q->dst, strides, lo, hi, hint, attr);
  q->wei_fwd = fwd.weights_desc();
  q->wei_bwd_data = bwd_data.weights_desc();
  q->wei_bwd_w = bwd_w.diff_weights_desc();
  q->k_fwd = dnnl::memory(q->wei_fwd, Engine());
  q->k_bwd_data = dnnl::memory(q->wei_bwd_data, Engine());
  q->k_bwd_w = dnnl::memory(q->wei_bwd_w, Engine());
  q->fwd = Step{dnnl::convolution_forward(fwd), fwd.scratchpad_desc()};
  q->bwd_data = Step{dnnl::convolution_backward_data(bwd_data), bwd_data.scratchpad_desc()};
  q->bwd_w = Step{dnnl::convolution_backward_weights(bwd_w), bwd_w.scratchpad_desc()};
  q->to_fwd = MakeReorder(q->wei, q->wei_fwd);
  q->to_bwd_data = MakeReorder(q->wei, q->wei_bwd_data);
  q->from_bwd_w = MakeReorder(q->wei_bwd_w, q->wei);
  for (const Step* step : {&q->fwd, &q->bwd_data, &q->bwd_w, &q->to_fwd, &q->to_bwd_data,
                           &q->from_bwd_w})
    if (step->prim) Scratch().Reserve(step->scratch.get_size());
  auto& ref = *q;
  cache.emplace(p.key(), std::move(q));
  return ref;
}

dnnl::memory Wrap(const dnnl::memory::desc& md, const void* ptr) {
  return dnnl::memory(md, Engine(), const_cast<void*>(ptr));
}

dnnl::stream& Stream() {
  static dnnl::stream s(Engine());
  return s;
}

// The user's HWIO kernel in the layout of `buffer` (reordered into it when they differ).
dnnl::memory KernelAs(const Primitives& q, const Step& reorder, dnnl::memory& buffer,
                      const void* ptr, dnnl::stream& s) {
  dnnl::memory user = Wrap(q.wei, ptr);
  if (!reorder.prim) return user;
  reorder.Run(s, {{DNNL_ARG_FROM, user}, {DNNL_ARG_TO, buffer}});
  return buffer;
}

// x (n, h, w, c) and kernel (kh, kw, c, o) dimensions -> the problem, or an error.
ffi::Error MakeProblem(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k, int64_t sh,
                       int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, Problem* p) {
  if (x.size() != 4 || k.size() != 4)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "onednn conv: expected rank-4 NHWC input and HWIO kernel");
  if (x[3] != k[2])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "onednn conv: kernel input channels differ from the input's");
  *p = Problem{x[0], x[1], x[2], x[3], k[0], k[1], k[3], sh, sw, pt, pb, pl, pr};
  return ffi::Error::Success();
}

template <typename F>
ffi::Error Guarded(F&& f) {
  try {
    std::lock_guard<std::mutex> lock(Mutex());
    f();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

// y = conv(x, k), plus b (when not null; then p.bias) and the ReLU post-op when p.relu.
ffi::Error RunForward(const Problem& p, const float* x, const float* k, const float* b,
                      float* y) {
  return Guarded([&] {
    Primitives& q = Get(p);
    dnnl::stream& s = Stream();
    std::unordered_map<int, dnnl::memory> args{
        {DNNL_ARG_SRC, Wrap(q.src, x)},
        {DNNL_ARG_WEIGHTS, KernelAs(q, q.to_fwd, q.k_fwd, k, s)},
        {DNNL_ARG_DST, Wrap(q.dst, y)}};
    if (b != nullptr) args.insert({DNNL_ARG_BIAS, Wrap(q.bias, b)});
    q.fwd.Run(s, std::move(args));
    s.wait();
  });
}

// dk (and db = sum of dy over n, oh, ow, when not null; then p.bias) for input x and
// output cotangent dy.
ffi::Error RunBackwardWeights(const Problem& p, const float* x, const float* dy, float* dk,
                              float* db) {
  return Guarded([&] {
    Primitives& q = Get(p);
    dnnl::stream& s = Stream();
    dnnl::memory user = Wrap(q.wei, dk);
    bool same = !q.from_bwd_w.prim;
    dnnl::memory out = same ? user : q.k_bwd_w;
    std::unordered_map<int, dnnl::memory> args{{DNNL_ARG_SRC, Wrap(q.src, x)},
                                               {DNNL_ARG_DIFF_DST, Wrap(q.dst, dy)},
                                               {DNNL_ARG_DIFF_WEIGHTS, out}};
    if (db != nullptr) args.insert({DNNL_ARG_DIFF_BIAS, Wrap(q.bias, db)});
    q.bwd_w.Run(s, std::move(args));
    if (!same) q.from_bwd_w.Run(s, {{DNNL_ARG_FROM, out}, {DNNL_ARG_TO, user}});
    s.wait();
  });
}

// A (o) buffer: one entry per output channel, or an error naming it.
ffi::Error CheckPerChannel(ffi::Span<const int64_t> dims, int64_t o, const char* what) {
  if (dims.size() == 1 && dims[0] == o) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    std::string("onednn conv: ") + what +
                        " must have one entry per output channel");
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                   int64_t pl, int64_t pr) {
  Problem p;
  if (auto e = MakeProblem(x.dimensions(), k.dimensions(), sh, sw, pt, pb, pl, pr, &p);
      e.failure())
    return e;
  return RunForward(p, x.typed_data(), k.typed_data(), nullptr, y->typed_data());
}

// dx = the input gradient for output cotangent dy; dx's buffer gives the input's shape.
ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> k,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                        int64_t pb, int64_t pl, int64_t pr) {
  Problem p;
  if (auto e = MakeProblem(dx->dimensions(), k.dimensions(), sh, sw, pt, pb, pl, pr, &p);
      e.failure())
    return e;
  return Guarded([&] {
    Primitives& q = Get(p);
    dnnl::stream& s = Stream();
    q.bwd_data.Run(
        s, {{DNNL_ARG_DIFF_DST, Wrap(q.dst, dy.typed_data())},
            {DNNL_ARG_WEIGHTS, KernelAs(q, q.to_bwd_data, q.k_bwd_data, k.typed_data(), s)},
            {DNNL_ARG_DIFF_SRC, Wrap(q.src, dx->typed_data())}});
    s.wait();
  });
}

// dk = the kernel gradient for input x and output cotangent dy.
ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dk, int64_t sh, int64_t sw, int64_t pt,
                           int64_t pb, int64_t pl, int64_t pr) {
  Problem p;
  if (auto e = MakeProblem(x.dimensions(), dk->dimensions(), sh, sw, pt, pb, pl, pr, &p);
      e.failure())
    return e;
  return RunBackwardWeights(p, x.typed_data(), dy.typed_data(), dk->typed_data(), nullptr);
}

// y = conv(x, k) + b, and max(0, y) when relu != 0, in one oneDNN call.
ffi::Error ForwardBias(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> b,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                       int64_t pb, int64_t pl, int64_t pr, int64_t relu) {
  Problem p;
  if (auto e = MakeProblem(x.dimensions(), k.dimensions(), sh, sw, pt, pb, pl, pr, &p);
      e.failure())
    return e;
  if (auto e = CheckPerChannel(b.dimensions(), p.o, "the bias"); e.failure()) return e;
  p.bias = true;
  p.relu = relu != 0;
  return RunForward(p, x.typed_data(), k.typed_data(), b.typed_data(), y->typed_data());
}

// (dk, db): the kernel gradient and the bias gradient.
ffi::Error BackwardWeightsBias(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> db,
                               int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                               int64_t pr) {
  Problem p;
  if (auto e = MakeProblem(x.dimensions(), dk->dimensions(), sh, sw, pt, pb, pl, pr, &p);
      e.failure())
    return e;
  if (auto e = CheckPerChannel(db->dimensions(), p.o, "the bias gradient"); e.failure())
    return e;
  p.bias = true;
  return RunBackwardWeights(p, x.typed_data(), dy.typed_data(), dk->typed_data(),
                            db->typed_data());
}

}  // namespace

#define JAXNETS_CONV_ATTRS \
  .Attr<int64_t>("sh")     \
      .Attr<int64_t>("sw") \
      .Attr<int64_t>("pt") \
      .Attr<int64_t>("pb") \
      .Attr<int64_t>("pl") \
      .Attr<int64_t>("pr")

#define JAXNETS_CONV_BINDING                                                           \
  ffi::Ffi::Bind()                                                                      \
      .Arg<ffi::Buffer<ffi::F32>>()                                                     \
      .Arg<ffi::Buffer<ffi::F32>>()                                                     \
      .Ret<ffi::Buffer<ffi::F32>>()                                                     \
      .Attr<int64_t>("sh")                                                              \
      .Attr<int64_t>("sw")                                                              \
      .Attr<int64_t>("pt")                                                              \
      .Attr<int64_t>("pb")                                                              \
      .Attr<int64_t>("pl")                                                              \
      .Attr<int64_t>("pr")

// Built with -fvisibility=hidden: only these six symbols are exported.
#define JAXNETS_EXPORT extern "C" __attribute__((visibility("default")))
JAXNETS_EXPORT XLA_FFI_Error* JaxnetsOnednnConvForward(XLA_FFI_CallFrame*);
JAXNETS_EXPORT XLA_FFI_Error* JaxnetsOnednnConvBackwardData(XLA_FFI_CallFrame*);
JAXNETS_EXPORT XLA_FFI_Error* JaxnetsOnednnConvBackwardWeights(XLA_FFI_CallFrame*);
JAXNETS_EXPORT XLA_FFI_Error* JaxnetsOnednnConvForwardBias(XLA_FFI_CallFrame*);
JAXNETS_EXPORT XLA_FFI_Error* JaxnetsOnednnConvBackwardWeightsBias(XLA_FFI_CallFrame*);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnetsOnednnConvForward, Forward, JAXNETS_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnetsOnednnConvBackwardData, BackwardData,
                              JAXNETS_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnetsOnednnConvBackwardWeights, BackwardWeights,
                              JAXNETS_CONV_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnetsOnednnConvForwardBias, ForwardBias,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() JAXNETS_CONV_ATTRS
                                  .Attr<int64_t>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnetsOnednnConvBackwardWeightsBias, BackwardWeightsBias,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() JAXNETS_CONV_ATTRS);

// jaxnets.ops.onednn checks this before registering the handlers.
JAXNETS_EXPORT int jaxnets_onednn_conv_abi() { return 2; }
