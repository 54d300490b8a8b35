// 2-D convolution (NHWC input, HWIO kernel, NHWC output, float32) as three XLA FFI handlers
// over oneDNN: forward, input gradient ("backward data") and kernel gradient ("backward
// weights"). jaxnets.ops.onednn loads this library, registers the handlers with
// jax.ffi and wraps them as differentiable JAX functions.
//
// Layouts: activations stay NHWC (oneDNN's "acdb"), which its direct convolutions read
// without a reorder; the kernel is reordered between HWIO and the blocked layout each
// primitive chooses (a few hundred KB at most, measured negligible).
//
// Primitives are built once per (shape, stride, padding) and cached. Calls are serialised
// by one mutex: oneDNN runs each call on its own OpenMP team over all cores, so two XLA
// threads calling at once would only oversubscribe the cores (and the library-managed
// scratchpad is shared).
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

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
struct Problem {
  int64_t n, h, w, c, kh, kw, o, sh, sw, pt, pb, pl, pr;
  int64_t oh() const { return (h + pt + pb - kh) / sh + 1; }
  int64_t ow() const { return (w + pl + pr - kw) / sw + 1; }
  auto key() const { return std::make_tuple(n, h, w, c, kh, kw, o, sh, sw, pt, pb, pl, pr); }
};

struct Primitives {
  dnnl::memory::desc src, wei, dst;             // the user's layouts: NHWC, HWIO, NHWC
  dnnl::memory::desc wei_fwd, wei_bwd_data, wei_bwd_w;  // the layouts the primitives chose
  dnnl::primitive fwd, bwd_data, bwd_w;
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
  dnnl::convolution_forward::primitive_desc fwd(Engine(), dnnl::prop_kind::forward_training,
                                                alg, q->src, any, q->dst, strides, lo, hi);
  dnnl::convolution_backward_data::primitive_desc bwd_data(Engine(), alg, q->src, any, q->dst,
                                                           strides, lo, hi, fwd);
  dnnl::convolution_backward_weights::primitive_desc bwd_w(Engine(), alg, q->src, any, q->dst,
                                                           strides, lo, hi, fwd);
  q->wei_fwd = fwd.weights_desc();
  q->wei_bwd_data = bwd_data.weights_desc();
  q->wei_bwd_w = bwd_w.diff_weights_desc();
  q->k_fwd = dnnl::memory(q->wei_fwd, Engine());
  q->k_bwd_data = dnnl::memory(q->wei_bwd_data, Engine());
  q->k_bwd_w = dnnl::memory(q->wei_bwd_w, Engine());
  q->fwd = dnnl::convolution_forward(fwd);
  q->bwd_data = dnnl::convolution_backward_data(bwd_data);
  q->bwd_w = dnnl::convolution_backward_weights(bwd_w);
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
dnnl::memory KernelAs(const Primitives& q, dnnl::memory& buffer, const void* ptr,
                      dnnl::stream& s) {
  dnnl::memory user = Wrap(q.wei, ptr);
  if (buffer.get_desc() == q.wei) return user;
  dnnl::reorder(user, buffer).execute(s, user, buffer);
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

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                   int64_t pl, int64_t pr) {
  Problem p;
  if (auto e = MakeProblem(x.dimensions(), k.dimensions(), sh, sw, pt, pb, pl, pr, &p);
      e.failure())
    return e;
  return Guarded([&] {
    Primitives& q = Get(p);
    dnnl::stream& s = Stream();
    q.fwd.execute(s, {{DNNL_ARG_SRC, Wrap(q.src, x.typed_data())},
                      {DNNL_ARG_WEIGHTS, KernelAs(q, q.k_fwd, k.typed_data(), s)},
                      {DNNL_ARG_DST, Wrap(q.dst, y->typed_data())}});
    s.wait();
  });
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
    q.bwd_data.execute(s, {{DNNL_ARG_DIFF_DST, Wrap(q.dst, dy.typed_data())},
                           {DNNL_ARG_WEIGHTS, KernelAs(q, q.k_bwd_data, k.typed_data(), s)},
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
  return Guarded([&] {
    Primitives& q = Get(p);
    dnnl::stream& s = Stream();
    dnnl::memory user = Wrap(q.wei, dk->typed_data());
    bool same = q.wei_bwd_w == q.wei;
    dnnl::memory out = same ? user : q.k_bwd_w;
    q.bwd_w.execute(s, {{DNNL_ARG_SRC, Wrap(q.src, x.typed_data())},
                        {DNNL_ARG_DIFF_DST, Wrap(q.dst, dy.typed_data())},
                        {DNNL_ARG_DIFF_WEIGHTS, out}});
    if (!same) dnnl::reorder(out, user).execute(s, out, user);
    s.wait();
  });
}

}  // namespace

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

// Built with -fvisibility=hidden: only these four symbols are exported.
#define JAXNETS_EXPORT extern "C" __attribute__((visibility("default")))
JAXNETS_EXPORT XLA_FFI_Error* JaxnetsOnednnConvForward(XLA_FFI_CallFrame*);
JAXNETS_EXPORT XLA_FFI_Error* JaxnetsOnednnConvBackwardData(XLA_FFI_CallFrame*);
JAXNETS_EXPORT XLA_FFI_Error* JaxnetsOnednnConvBackwardWeights(XLA_FFI_CallFrame*);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnetsOnednnConvForward, Forward, JAXNETS_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnetsOnednnConvBackwardData, BackwardData,
                              JAXNETS_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxnetsOnednnConvBackwardWeights, BackwardWeights,
                              JAXNETS_CONV_BINDING);

// jaxnets.ops.onednn checks this before registering the handlers.
JAXNETS_EXPORT int jaxnets_onednn_conv_abi() { return 1; }
