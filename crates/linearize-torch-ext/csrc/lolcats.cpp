// Fused LoLCATs attention (triton/lolcats.py), both window shapes, with or without sink tokens
// (the first `sinks` keys: softmax keys of every later query, never linear ones), as an autograd
// function. The
// backward always forms the feature-map and window-factor gradients (attention transfer trains
// only those) and adds the q, k and v gradients, which need passes over the window, when asked.
// Normalised linear attention, the sw shape's linear terms with no window, is a second autograd
// function over the same sums and feature-map gradient kernels.
#include "ffi_error.h"
#include "triton_launch.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <utility>

#ifdef LINEARIZE_CUDA
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kChunk = 64;
constexpr int64_t kFeatureBlock = 64;
// Rows per program of `grad_terms` (GRAD_ROWS in triton/compile.py).
constexpr int64_t kGradRows = 32;
// `backward_sink_kv` runs about kSinkPrograms programs in all (segments of query chunks times
// batch-heads), each over at least kSinkSegment query chunks: enough programs that none outlasts
// `backward_kv`'s grid by much, few enough that their f32 partial sums stay small (at most
// kSinkPrograms x 64 sink rows x d per sink chunk).
constexpr int64_t kSinkPrograms = 512;
constexpr int64_t kSinkSegment = 4;

// The dtype part of a kernel's key: "f16" or "bf16" (the inputs are one or the other).
std::string dtype_of(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf ? "f16" : "bf16";
}

std::string variant(const char* kernel, bool terrace, int64_t d, int64_t f,
                    const std::string& dtype) {
  return std::string(kernel) + (terrace ? "/tk" : "/sw") + "/d" + std::to_string(d) + "/f" +
         std::to_string(f) + "/" + dtype;
}

// Exclusive sums over chunks of a_c^T b_c (bh, n, F, D) in b's dtype (f32 for f16, whose range
// sums over long sequences can exceed) and of w·a (bh, n, F) in f32: over the chunks before each
// chunk, or after it when `reverse` (then w = `weights`), leaving out the rows before `skip`.
std::pair<at::Tensor, at::Tensor> chunk_sums(const at::Tensor& a, const at::Tensor& b,
                                             const at::Tensor* weights, int64_t heads,
                                             bool reverse, int64_t skip) {
  int64_t batch = a.size(0), len = a.size(2), f = a.size(3), d = b.size(3);
  int64_t n = (len + kChunk - 1) / kChunk;
  auto sums = at::empty({batch * heads, n, f, d},
                        b.options().dtype(b.scalar_type() == at::kHalf ? at::kFloat
                                                                      : b.scalar_type()));
  auto weight_sums = at::empty({batch * heads, n, f}, b.options().dtype(at::kFloat));
  auto key = "chunk_sums/d" + std::to_string(d) + "/f" + std::to_string(f) +
             (reverse ? "/reverse/" : "/forward/") + dtype_of(b);
  using linearize::KernelArg;
  linearize::launch(key, a.device(), batch * heads, f / kFeatureBlock,
                    {KernelArg::ptr(a), KernelArg::ptr(b),
                     KernelArg::ptr(weights ? *weights : weight_sums), KernelArg::ptr(sums),
                     KernelArg::ptr(weight_sums), KernelArg::i32(len), KernelArg::i32(n),
                     KernelArg::i32(heads), KernelArg::i32(a.size(1)), KernelArg::i32(b.size(1)),
                     KernelArg::i32(skip)});
  return {sums, weight_sums};
}

// g/den and −g·y/den from the output gradient g: the gradients of the numerator (y's dtype) and
// of the normaliser (f32).
std::pair<at::Tensor, at::Tensor> gradient_terms(const at::Tensor& grad, const at::Tensor& y,
                                                 const at::Tensor& den) {
  auto g = grad.to(y.scalar_type()).contiguous();
  auto grad_num = at::empty_like(y);
  auto grad_den = at::empty_like(den);
  int64_t rows = y.numel() / y.size(3);
  using linearize::KernelArg;
  linearize::launch("grad_terms/d" + std::to_string(y.size(3)) + "/" + dtype_of(y), y.device(),
                    (rows + kGradRows - 1) / kGradRows, 1,
                    {KernelArg::ptr(g), KernelArg::ptr(y), KernelArg::ptr(den),
                     KernelArg::ptr(grad_num), KernelArg::ptr(grad_den), KernelArg::i32(rows)});
  return {grad_num, grad_den};
}

// dφq of the linear terms (the keys before each query's window but the sinks), and mu = φq·dφq
// into `mu`.
at::Tensor backward_phi_q(const at::Tensor& grad_num, const at::Tensor& grad_den,
                          const at::Tensor& v, const at::Tensor& phi_q, const at::Tensor& phi_k,
                          const at::Tensor& sums, const at::Tensor& k_sums, const at::Tensor& mu,
                          bool terrace, int64_t window, int64_t sinks) {
  int64_t heads = phi_q.size(1), len = phi_q.size(2), n = (len + kChunk - 1) / kChunk;
  auto d_phi_q = at::empty_like(phi_q);
  using linearize::KernelArg;
  linearize::launch(
      variant("backward_phi_q", terrace, v.size(3), phi_q.size(3), dtype_of(v)), v.device(), n,
      phi_q.size(0) * heads,
      {KernelArg::ptr(grad_num), KernelArg::ptr(grad_den), KernelArg::ptr(v),
       KernelArg::ptr(phi_q), KernelArg::ptr(phi_k), KernelArg::ptr(sums), KernelArg::ptr(k_sums),
       KernelArg::ptr(d_phi_q), KernelArg::ptr(mu), KernelArg::i32(len), KernelArg::i32(n),
       KernelArg::i32(heads), KernelArg::i32(v.size(1)), KernelArg::i32(window / kChunk),
       KernelArg::i32(sinks)});
  return d_phi_q;
}

// dφk of the linear terms (the queries whose windows lie after each key; zero for the sinks),
// from the reverse sums of φq^T gn and gd·φq.
at::Tensor backward_phi_k(const at::Tensor& grad_num, const at::Tensor& grad_den,
                          const at::Tensor& v, const at::Tensor& phi_q, const at::Tensor& phi_k,
                          const at::Tensor& q_sums, const at::Tensor& q_den_sums, bool terrace,
                          int64_t window, int64_t sinks) {
  int64_t heads = phi_q.size(1), len = phi_q.size(2), n = (len + kChunk - 1) / kChunk;
  auto d_phi_k = at::empty_like(phi_k);
  using linearize::KernelArg;
  linearize::launch(
      variant("backward_phi_k", terrace, v.size(3), phi_q.size(3), dtype_of(v)), v.device(), n,
      phi_q.size(0) * heads,
      {KernelArg::ptr(grad_num), KernelArg::ptr(grad_den), KernelArg::ptr(v),
       KernelArg::ptr(phi_q), KernelArg::ptr(q_sums), KernelArg::ptr(q_den_sums),
       KernelArg::ptr(d_phi_k), KernelArg::i32(len), KernelArg::i32(n), KernelArg::i32(heads),
       KernelArg::i32(v.size(1)), KernelArg::i32(window / kChunk), KernelArg::i32(sinks)});
  return d_phi_k;
}

// A gradient per query head (b, h, L, d) summed over the heads that share one of `shared` heads.
at::Tensor sum_shared_heads(const at::Tensor& grad, int64_t shared) {
  int64_t heads = grad.size(1);
  if (shared == heads) return grad;
  return grad.view({grad.size(0), shared, heads / shared, grad.size(2), grad.size(3)}).sum(2);
}

// Adds to dk and dv per query head (b, h, L, d) the sink chunks' gradients from the query chunks
// after their window range (`backward_kv` covers the window range): partial sums per segment of
// query chunks in f32, summed here and added with one rounding.
void add_sink_grads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& grad_num, const at::Tensor& grad_den,
                    const at::Tensor& maxes, const at::Tensor& argmaxes, const at::Tensor& mu,
                    const at::Tensor& gammas, at::Tensor& dk_heads, at::Tensor& dv_heads,
                    bool terrace, int64_t window, int64_t sinks) {
  int64_t batch = q.size(0), heads = q.size(1), len = q.size(2), d = q.size(3);
  int64_t n = (len + kChunk - 1) / kChunk;
  int64_t segments =
      std::max<int64_t>(1, std::min(kSinkPrograms / (batch * heads),
                                    (n + kSinkSegment - 1) / kSinkSegment));
  int64_t seg_len = (n + segments - 1) / segments;
  segments = (n + seg_len - 1) / seg_len;
  int64_t sink_rows = (sinks + kChunk - 1) / kChunk * kChunk;
  auto part_k = at::empty({batch * heads, segments, sink_rows, d}, q.options().dtype(at::kFloat));
  auto part_v = at::empty_like(part_k);
  using linearize::KernelArg;
  linearize::launch(
      std::string("backward_sink_kv/") + (terrace ? "tk" : "sw") + "/d" + std::to_string(d) +
          "/bf16",
      q.device(), segments, batch * heads,
      {KernelArg::ptr(q), KernelArg::ptr(k), KernelArg::ptr(v), KernelArg::ptr(grad_num),
       KernelArg::ptr(grad_den), KernelArg::ptr(maxes), KernelArg::ptr(argmaxes),
       KernelArg::ptr(mu), KernelArg::ptr(gammas), KernelArg::ptr(part_k), KernelArg::ptr(part_v),
       KernelArg::i32(len), KernelArg::i32(n), KernelArg::i32(heads), KernelArg::i32(k.size(1)),
       KernelArg::i32(v.size(1)), KernelArg::i32(window / kChunk), KernelArg::i32(sinks),
       KernelArg::i32(seg_len), KernelArg::f32(1.0 / std::sqrt(static_cast<double>(d)))});
  int64_t rows = std::min(sink_rows, len);
  for (auto [grad, part] : {std::pair{dk_heads, part_k}, std::pair{dv_heads, part_v}}) {
    auto sink = grad.view({batch * heads, len, d}).narrow(1, 0, rows);
    sink.copy_(sink.to(at::kFloat) + part.sum(1).narrow(1, 0, rows));
  }
}

struct Lolcats : public torch::autograd::Function<Lolcats> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& phi_q, const at::Tensor& phi_k,
                            const at::Tensor& gammas, bool terrace, int64_t window,
                            int64_t sinks) {
    int64_t batch = q.size(0), heads = q.size(1), len = q.size(2), d = q.size(3);
    int64_t f = phi_q.size(3), n = (len + kChunk - 1) / kChunk;
    auto [sums, k_sums] = chunk_sums(phi_k, v, nullptr, heads, false, sinks);
    auto y = at::empty_like(q);
    auto den = at::empty({batch, heads, len}, q.options().dtype(at::kFloat));
    auto maxes = at::empty_like(den);
    auto argmaxes = at::empty({batch, heads, len}, q.options().dtype(at::kInt));
    using linearize::KernelArg;
    linearize::launch(
        variant("forward", terrace, d, f, "bf16"), q.device(), n, batch * heads,
        {KernelArg::ptr(q), KernelArg::ptr(k), KernelArg::ptr(v), KernelArg::ptr(phi_q),
         KernelArg::ptr(phi_k), KernelArg::ptr(sums), KernelArg::ptr(k_sums),
         KernelArg::ptr(gammas), KernelArg::ptr(y), KernelArg::ptr(den), KernelArg::ptr(maxes),
         KernelArg::ptr(argmaxes), KernelArg::i32(len),
         KernelArg::i32(n), KernelArg::i32(heads), KernelArg::i32(k.size(1)),
         KernelArg::i32(v.size(1)), KernelArg::i32(window / kChunk), KernelArg::i32(sinks),
         KernelArg::f32(1.0 / std::sqrt(static_cast<double>(d)))});
    ctx->save_for_backward({q, k, v, phi_q, phi_k, gammas, y});
    ctx->saved_data["den"] = den;
    ctx->saved_data["maxes"] = maxes;
    ctx->saved_data["argmaxes"] = argmaxes;
    ctx->saved_data["sums"] = sums;
    ctx->saved_data["k_sums"] = k_sums;
    ctx->saved_data["window"] = window;
    ctx->saved_data["terrace"] = terrace;
    ctx->saved_data["sinks"] = sinks;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto &q = saved[0], &k = saved[1], &v = saved[2], &phi_q = saved[3], &phi_k = saved[4],
               &gammas = saved[5], &y = saved[6];
    auto den = ctx->saved_data["den"].toTensor();
    auto maxes = ctx->saved_data["maxes"].toTensor();
    auto argmaxes = ctx->saved_data["argmaxes"].toTensor();
    auto sums = ctx->saved_data["sums"].toTensor();
    auto k_sums = ctx->saved_data["k_sums"].toTensor();
    int64_t window = ctx->saved_data["window"].toInt();
    bool terrace = ctx->saved_data["terrace"].toBool();
    int64_t sinks = ctx->saved_data["sinks"].toInt();
    int64_t batch = y.size(0), heads = y.size(1), len = y.size(2), d = y.size(3);
    int64_t f = phi_q.size(3), n = (len + kChunk - 1) / kChunk;

    auto [grad_num, grad_den] = gradient_terms(grads[0], y, den);
    auto mu = at::empty_like(den);
    auto d_phi_q = backward_phi_q(grad_num, grad_den, v, phi_q, phi_k, sums, k_sums, mu, terrace,
                                  window, sinks);
    auto [q_sums, q_den_sums] = chunk_sums(phi_q, grad_num, &grad_den, heads, true, 0);
    auto d_phi_k = backward_phi_k(grad_num, grad_den, v, phi_q, phi_k, q_sums, q_den_sums, terrace,
                                  window, sinks);
    // y is unchanged when γ and φq scale together: dγ_h = −Σ φq·dφq / γ_h.
    auto d_gammas = -mu.sum(at::IntArrayRef{0, 2}) / gammas;

    double scale = 1.0 / std::sqrt(static_cast<double>(d));
    using linearize::KernelArg;
    at::Tensor dq, dk, dv;
    if (ctx->needs_input_grad(0)) {
      dq = at::empty_like(q);
      linearize::launch(
          std::string("backward_q/") + (terrace ? "tk" : "sw") + "/d" + std::to_string(d) +
              "/bf16",
          y.device(), n, batch * heads,
          {KernelArg::ptr(q), KernelArg::ptr(k), KernelArg::ptr(v), KernelArg::ptr(grad_num),
           KernelArg::ptr(grad_den), KernelArg::ptr(maxes), KernelArg::ptr(argmaxes),
           KernelArg::ptr(mu), KernelArg::ptr(gammas), KernelArg::ptr(dq), KernelArg::i32(len),
           KernelArg::i32(heads), KernelArg::i32(k.size(1)), KernelArg::i32(v.size(1)),
           KernelArg::i32(window / kChunk), KernelArg::i32(sinks), KernelArg::f32(scale)});
    }
    if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) {
      // Per query head, then summed over the heads that share a key or value head.
      auto dk_heads = at::empty_like(q);
      auto dv_heads = at::empty_like(q);
      linearize::launch(
          variant("backward_kv", terrace, d, f, "bf16"), y.device(), n, batch * heads,
          {KernelArg::ptr(q), KernelArg::ptr(k), KernelArg::ptr(v), KernelArg::ptr(phi_q),
           KernelArg::ptr(phi_k), KernelArg::ptr(grad_num), KernelArg::ptr(grad_den),
           KernelArg::ptr(maxes), KernelArg::ptr(argmaxes), KernelArg::ptr(mu),
           KernelArg::ptr(gammas), KernelArg::ptr(q_sums), KernelArg::ptr(dk_heads),
           KernelArg::ptr(dv_heads), KernelArg::i32(len), KernelArg::i32(n),
           KernelArg::i32(heads), KernelArg::i32(k.size(1)), KernelArg::i32(v.size(1)),
           KernelArg::i32(window / kChunk), KernelArg::i32(sinks), KernelArg::f32(scale)});
      if (sinks > 0) {
        add_sink_grads(q, k, v, grad_num, grad_den, maxes, argmaxes, mu, gammas, dk_heads,
                       dv_heads, terrace, window, sinks);
      }
      dk = sum_shared_heads(dk_heads, k.size(1));
      dv = sum_shared_heads(dv_heads, v.size(1));
    }
    return {dq, dk, dv, d_phi_q, d_phi_k, d_gammas, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Normalised linear attention y = Σ_{s<=t} (φq_t·φk_s) v_s / (Σ_{s<=t} φq_t·φk_s + eps): the sw
// kernels' linear terms with an empty window (every key at or before the query is linear).
struct LinearAttn : public torch::autograd::Function<LinearAttn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& phi_q, const at::Tensor& phi_k,
                            const at::Tensor& v, double eps) {
    int64_t batch = phi_q.size(0), heads = phi_q.size(1), len = phi_q.size(2);
    int64_t f = phi_q.size(3), d = v.size(3), n = (len + kChunk - 1) / kChunk;
    auto [sums, k_sums] = chunk_sums(phi_k, v, nullptr, heads, false, 0);
    auto y = at::empty({batch, heads, len, d}, v.options());
    auto den = at::empty({batch, heads, len}, v.options().dtype(at::kFloat));
    using linearize::KernelArg;
    linearize::launch("linear_forward/d" + std::to_string(d) + "/f" + std::to_string(f) + "/" +
                          dtype_of(v),
                      v.device(), n, batch * heads,
                      {KernelArg::ptr(v), KernelArg::ptr(phi_q), KernelArg::ptr(phi_k),
                       KernelArg::ptr(sums), KernelArg::ptr(k_sums), KernelArg::ptr(y),
                       KernelArg::ptr(den), KernelArg::i32(len), KernelArg::i32(n),
                       KernelArg::i32(heads), KernelArg::i32(v.size(1)), KernelArg::f32(eps)});
    ctx->save_for_backward({phi_q, phi_k, v, y});
    ctx->saved_data["den"] = den;
    ctx->saved_data["sums"] = sums;
    ctx->saved_data["k_sums"] = k_sums;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto &phi_q = saved[0], &phi_k = saved[1], &v = saved[2], &y = saved[3];
    auto den = ctx->saved_data["den"].toTensor();
    int64_t batch = y.size(0), heads = y.size(1), len = y.size(2), d = y.size(3);
    int64_t f = phi_q.size(3), n = (len + kChunk - 1) / kChunk;
    auto [grad_num, grad_den] = gradient_terms(grads[0], y, den);
    at::Tensor d_phi_q, d_phi_k, dv;
    if (ctx->needs_input_grad(0)) {
      // mu (φq·dφq) is LoLCATs' window share; the linear form has no window to give it to.
      auto mu = at::empty_like(den);
      d_phi_q = backward_phi_q(grad_num, grad_den, v, phi_q, phi_k,
                               ctx->saved_data["sums"].toTensor(),
                               ctx->saved_data["k_sums"].toTensor(), mu, false, 0, 0);
    }
    if (!ctx->needs_input_grad(1) && !ctx->needs_input_grad(2)) {
      return {d_phi_q, d_phi_k, dv, at::Tensor()};
    }
    auto [q_sums, q_den_sums] = chunk_sums(phi_q, grad_num, &grad_den, heads, true, 0);
    if (ctx->needs_input_grad(1)) {
      d_phi_k =
          backward_phi_k(grad_num, grad_den, v, phi_q, phi_k, q_sums, q_den_sums, false, 0, 0);
    }
    if (ctx->needs_input_grad(2)) {
      auto dv_heads = at::empty_like(y);
      using linearize::KernelArg;
      linearize::launch("linear_backward_v/d" + std::to_string(d) + "/f" + std::to_string(f) +
                            "/" + dtype_of(v),
                        v.device(), n, batch * heads,
                        {KernelArg::ptr(phi_q), KernelArg::ptr(phi_k), KernelArg::ptr(grad_num),
                         KernelArg::ptr(q_sums), KernelArg::ptr(dv_heads), KernelArg::i32(len),
                         KernelArg::i32(n)});
      dv = sum_shared_heads(dv_heads, v.size(1));
    }
    return {d_phi_q, d_phi_k, dv, at::Tensor()};
  }
};

}  // namespace
#endif

using linearize::set_error;

extern "C" {

// y = LoLCATs attention of contiguous bf16 q (b, h, L, d), k (b, h_k, L, d), v (b, h_v, L, d),
// φq and φk (b, h, L, f), with window factors γ (h) in f32, a window of `window` tokens (a
// multiple of 64; terrace blocks when `terrace`) and `sinks` >= 0 sink tokens (φk's sink rows are
// not read), into `*out` (a new tensor).
int linearize_lolcats(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v,
                      const at::Tensor* phi_q, const at::Tensor* phi_k, const at::Tensor* gammas,
                      int terrace, int64_t window, int64_t sinks, at::Tensor** out, char* err,
                      size_t err_len) {
#ifdef LINEARIZE_CUDA
  try {
    auto y = Lolcats::apply(*q, *k, *v, *phi_q, *phi_k, *gammas, terrace != 0, window, sinks);
    *out = new at::Tensor(std::move(y));
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, e.what());
    return 1;
  }
#else
  (void)q, (void)k, (void)v, (void)phi_q, (void)phi_k, (void)gammas, (void)terrace, (void)window,
      (void)sinks, (void)out;
  if (err != nullptr && err_len > 0) {
    std::snprintf(err, err_len, "%s", "built without CUDA");
  }
  return 1;
#endif
}

// y = normalised linear attention of contiguous φq and φk (b, h, L, f) and v (b, h_v, L, d), all
// bf16 or all f16, with `eps` added to the normaliser, from the empty state, into `*out` (a new
// tensor in v's dtype). The caller has checked the shapes and that the kernels exist.
int linearize_linear_attn(const at::Tensor* phi_q, const at::Tensor* phi_k, const at::Tensor* v,
                          double eps, at::Tensor** out, char* err, size_t err_len) {
#ifdef LINEARIZE_CUDA
  try {
    auto y = LinearAttn::apply(*phi_q, *phi_k, *v, eps);
    *out = new at::Tensor(std::move(y));
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, e.what());
    return 1;
  }
#else
  (void)phi_q, (void)phi_k, (void)v, (void)eps, (void)out;
  if (err != nullptr && err_len > 0) {
    std::snprintf(err, err_len, "%s", "built without CUDA");
  }
  return 1;
#endif
}
}
