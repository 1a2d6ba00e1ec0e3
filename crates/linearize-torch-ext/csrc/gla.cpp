// Fused gated linear attention (triton/gla.py) from the empty state, as an autograd function.
// The forward keeps the in-chunk cumulative log-gates and the chunks' decayed scores for the
// backward, which recomputes the states entering each chunk (one scan) rather than keeping them.
#include "ffi_error.h"
#include "triton_launch.h"

#include <algorithm>
#include <cstdio>
#include <exception>

#ifdef LINEARIZE_CUDA
#include <torch/csrc/autograd/custom_function.h>

namespace {

using linearize::KernelArg;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// GLA_CHUNK, GLA_SUB_CHUNK and GLA_BLOCK in triton/compile.py.
constexpr int64_t kChunk = 64;
constexpr int64_t kSubChunk = 16;
constexpr int64_t kBlock = 64;

// Sizes of one call: q (b, h, L, d), k (b, hk, L, d), v (b, hv, L, d), g (b, hg, L, d).
struct Dims {
  int64_t batch, heads, len, d, hk, hv, hg, n, padded;
  std::string dtype;

  Dims(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g)
      : batch(q.size(0)),
        heads(q.size(1)),
        len(q.size(2)),
        d(q.size(3)),
        hk(k.size(1)),
        hv(v.size(1)),
        hg(g.size(1)),
        n((q.size(2) + kChunk - 1) / kChunk),
        padded(n * kChunk),
        dtype(q.scalar_type() == at::kHalf ? "f16" : "bf16") {}

  // The compiled form of `kernel` for this head size (and q, k, v dtype when `typed`).
  std::string key(const char* kernel, bool typed = true) const {
    return std::string("gla/") + kernel + "/d" + std::to_string(d) + (typed ? "/" + dtype : "");
  }
  int64_t blocks() const { return d / std::min(d, kBlock); }
  int64_t bh() const { return batch * heads; }
};

// In-chunk cumulative log-gates (b·hg, n·C, d) f32.
at::Tensor cumulative_gates(const at::Tensor& g, const Dims& s) {
  auto gc = at::empty({s.batch * s.hg, s.padded, s.d}, g.options());
  linearize::launch(s.key("chunk_cumsum", false), g.device(), s.n, s.batch * s.hg,
                    {KernelArg::ptr(g), KernelArg::ptr(gc), KernelArg::i32(s.len),
                     KernelArg::i32(s.padded)});
  return gc;
}

// The state entering each chunk (b·h, n, d, d) in v's dtype.
at::Tensor chunk_states(const at::Tensor& k, const at::Tensor& v, const at::Tensor& gc,
                        const Dims& s) {
  auto hs = at::empty({s.bh(), s.n, s.d, s.d}, v.options());
  linearize::launch(s.key("forward_states"), v.device(), s.blocks() * s.blocks(), s.bh(),
                    {KernelArg::ptr(k), KernelArg::ptr(v), KernelArg::ptr(gc), KernelArg::ptr(hs),
                     KernelArg::i32(s.len), KernelArg::i32(s.padded), KernelArg::i32(s.n),
                     KernelArg::i32(s.heads), KernelArg::i32(s.hk), KernelArg::i32(s.hv),
                     KernelArg::i32(s.hg)});
  return hs;
}

struct Gla : public torch::autograd::Function<Gla> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& g) {
    Dims s(q, k, v, g);
    auto gc = cumulative_gates(g, s);
    auto hs = chunk_states(k, v, gc, s);
    auto scores = at::empty({s.bh(), s.padded, kChunk}, g.options());
    linearize::launch(s.key("forward_scores"), q.device(), s.n * (kChunk / kSubChunk), s.bh(),
                      {KernelArg::ptr(q), KernelArg::ptr(k), KernelArg::ptr(gc),
                       KernelArg::ptr(scores), KernelArg::i32(s.len), KernelArg::i32(s.padded),
                       KernelArg::i32(s.heads), KernelArg::i32(s.hk), KernelArg::i32(s.hg)});
    auto o = at::empty({s.batch, s.heads, s.len, s.d}, v.options());
    linearize::launch(s.key("forward_output"), q.device(), s.n * s.blocks(), s.bh(),
                      {KernelArg::ptr(q), KernelArg::ptr(v), KernelArg::ptr(gc),
                       KernelArg::ptr(hs), KernelArg::ptr(scores), KernelArg::ptr(o),
                       KernelArg::i32(s.len), KernelArg::i32(s.padded), KernelArg::i32(s.n),
                       KernelArg::i32(s.heads), KernelArg::i32(s.hv), KernelArg::i32(s.hg)});
    ctx->save_for_backward({q, k, v, g});
    ctx->saved_data["gc"] = gc;
    ctx->saved_data["scores"] = scores;
    return o;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto &q = saved[0], &k = saved[1], &v = saved[2], &g = saved[3];
    auto gc = ctx->saved_data["gc"].toTensor();
    auto scores = ctx->saved_data["scores"].toTensor();
    Dims s(q, k, v, g);
    auto dev = q.device();
    auto f32 = g.options();
    auto grad = grads[0].to(v.scalar_type()).contiguous();

    auto hs = chunk_states(k, v, gc, s);
    auto grad_states = at::empty({s.bh(), s.n, s.d, s.d}, v.options());
    linearize::launch(s.key("backward_states"), dev, s.blocks() * s.blocks(), s.bh(),
                      {KernelArg::ptr(q), KernelArg::ptr(grad), KernelArg::ptr(gc),
                       KernelArg::ptr(grad_states), KernelArg::i32(s.len),
                       KernelArg::i32(s.padded), KernelArg::i32(s.n), KernelArg::i32(s.heads),
                       KernelArg::i32(s.hg)});
    auto grad_scores = at::empty({s.bh(), s.padded, kChunk}, f32);
    linearize::launch(s.key("backward_scores"), dev, s.n, s.bh(),
                      {KernelArg::ptr(grad), KernelArg::ptr(v), KernelArg::ptr(grad_scores),
                       KernelArg::i32(s.len), KernelArg::i32(s.padded), KernelArg::i32(s.heads),
                       KernelArg::i32(s.hv)});
    auto dq_intra = at::empty({s.batch, s.heads, s.len, s.d}, f32);
    auto dk_intra = at::empty_like(dq_intra);
    linearize::launch(s.key("backward_intra"), dev, s.n * (kChunk / kSubChunk), s.bh(),
                      {KernelArg::ptr(q), KernelArg::ptr(k), KernelArg::ptr(gc),
                       KernelArg::ptr(grad_scores), KernelArg::ptr(dq_intra),
                       KernelArg::ptr(dk_intra), KernelArg::i32(s.len), KernelArg::i32(s.padded),
                       KernelArg::i32(s.heads), KernelArg::i32(s.hk), KernelArg::i32(s.hg)});
    // Gradients of k, v and the log-gates per query head, summed below over the heads that
    // share one.
    auto dv_heads = at::empty({s.batch, s.heads, s.len, s.d}, v.options());
    linearize::launch(s.key("backward_dv"), dev, s.n * s.blocks(), s.bh(),
                      {KernelArg::ptr(k), KernelArg::ptr(gc), KernelArg::ptr(scores),
                       KernelArg::ptr(grad), KernelArg::ptr(grad_states),
                       KernelArg::ptr(dv_heads), KernelArg::i32(s.len), KernelArg::i32(s.padded),
                       KernelArg::i32(s.n), KernelArg::i32(s.heads), KernelArg::i32(s.hk),
                       KernelArg::i32(s.hg)});
    auto dq = at::empty_like(dv_heads);
    auto dk_heads = at::empty_like(dv_heads);
    auto dg_terms = at::empty_like(dq_intra);
    linearize::launch(s.key("backward_inter"), dev, s.n * s.blocks(), s.bh(),
                      {KernelArg::ptr(q), KernelArg::ptr(k), KernelArg::ptr(v),
                       KernelArg::ptr(gc), KernelArg::ptr(hs), KernelArg::ptr(grad_states),
                       KernelArg::ptr(grad), KernelArg::ptr(dq_intra), KernelArg::ptr(dk_intra),
                       KernelArg::ptr(dq), KernelArg::ptr(dk_heads), KernelArg::ptr(dg_terms),
                       KernelArg::i32(s.len), KernelArg::i32(s.padded), KernelArg::i32(s.n),
                       KernelArg::i32(s.heads), KernelArg::i32(s.hk), KernelArg::i32(s.hv),
                       KernelArg::i32(s.hg)});
    // dg_terms is free again: dq_intra's buffer takes its reverse cumulative sum.
    auto dg_heads = dq_intra;
    linearize::launch(s.key("reverse_cumsum", false), dev, s.blocks(), s.bh(),
                      {KernelArg::ptr(dg_terms), KernelArg::ptr(dg_heads), KernelArg::i32(s.len),
                       KernelArg::i32(s.n)});
    auto per_head = [&](const at::Tensor& x, int64_t shared) {
      if (shared == s.heads) return x;
      return x.view({s.batch, shared, s.heads / shared, s.len, s.d}).sum(2);
    };
    return {dq, per_head(dk_heads, s.hk), per_head(dv_heads, s.hv), per_head(dg_heads, s.hg)};
  }
};

}  // namespace
#endif

using linearize::set_error;

extern "C" {

// o = gated linear attention of contiguous q (b, h, L, d), k (b, h_k, L, d), v (b, h_v, L, d),
// all bf16 or all f16, and log-gates g (b, h_g, L, d) in f32, from the empty state, into `*out`
// (a new tensor in v's dtype). The caller has checked the shapes and that the kernels exist.
int linearize_gla(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v,
                  const at::Tensor* g, at::Tensor** out, char* err, size_t err_len) {
#ifdef LINEARIZE_CUDA
  try {
    auto o = Gla::apply(*q, *k, *v, *g);
    *out = new at::Tensor(std::move(o));
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, e.what());
    return 1;
  }
#else
  (void)q, (void)k, (void)v, (void)g, (void)out;
  if (err != nullptr && err_len > 0) {
    std::snprintf(err, err_len, "%s", "built without CUDA");
  }
  return 1;
#endif
}
}
