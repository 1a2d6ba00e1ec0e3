// C entry points over libtorch's multi-tensor optimizer kernels, which tch does not bind. Tensors
// arrive as tch's handles (`at::Tensor*`); errors come back as a message in `err` and a non-zero
// return.
#include "ffi_error.h"
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <exception>
#include <vector>

namespace {
std::vector<at::Tensor> list(at::Tensor* const* tensors, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(*tensors[i]);
  }
  return out;
}
}  // namespace

using linearize::set_error;

extern "C" {

// One AdamW update of `n` tensors that share a device and dtype: the step counts (f32 scalars)
// advance by one, then `_fused_adamw_` updates parameters and moments in one kernel per chunk of
// tensors.
int linearize_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads,
                          at::Tensor* const* exp_avgs, at::Tensor* const* exp_avg_sqs,
                          at::Tensor* const* steps, size_t n, double lr, double beta1,
                          double beta2, double weight_decay, double eps, char* err,
                          size_t err_len) {
  try {
    c10::AutoGradMode no_grad(false);
    auto step_list = list(steps, n);
    at::_foreach_add_(step_list, 1.0);
    at::_fused_adamw_(list(params, n), list(grads, n), list(exp_avgs, n), list(exp_avg_sqs, n),
                      {}, step_list, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, e.what());
    return 1;
  }
}

// dst[i].copy_(src[i]) for every i, in as few kernels as libtorch manages.
int linearize_foreach_copy(at::Tensor* const* dst, at::Tensor* const* src, size_t n, char* err,
                           size_t err_len) {
  try {
    c10::AutoGradMode no_grad(false);
    at::_foreach_copy_(list(dst, n), list(src, n));
    return 0;
  } catch (const std::exception& e) {
    set_error(err, err_len, e.what());
    return 1;
  }
}
}
