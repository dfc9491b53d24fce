// libtorch's multi-tensor optimizer kernels, which tch does not generate
// bindings for (its generator skips every `_foreach*` and `_fused_adam*` op):
// AdamW fused over a list of parameters, a list norm, lerp and add in place,
// and dropping gradients. Each is a few kernel launches for the whole list
// instead of several per tensor. Rust passes tch's handles (at::Tensor*) as
// arrays; errors come back through a buffer, as in dim-scan's shim.
#include <ATen/ATen.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_lerp.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/_fused_adamw.h>
#include <c10/core/GradMode.h>

#include "dim_shim.h"

#include <cstring>
#include <exception>
#include <optional>
#include <vector>

namespace {

std::vector<at::Tensor> list(void** ts, int n) {
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) out.push_back(*static_cast<at::Tensor*>(ts[i]));
  return out;
}

// Runs `body` without autograd recording (the ops update leaves in place),
// through the shared error guard.
template <typename F>
int guarded(char* err, size_t len, F&& body) {
  return dim_shim::guarded(err, len, [&] {
    c10::AutoGradMode no_grad(false);
    body();
  });
}

}  // namespace

extern "C" {

// One AdamW step over n parameters (PyTorch's `_fused_adamw_`): decoupled
// decay p *= 1 - lr*wd, then the Adam update with bias corrections from
// `steps` (f32 scalars on the parameters' device, already incremented).
// `grad_scale` (f32 scalar, may be NULL) divides every gradient first.
int dim_fused_adamw(void** params, void** grads, void** exp_avgs, void** exp_avg_sqs,
                    void** steps, int n, double lr, double beta1, double beta2,
                    double weight_decay, double eps, void* grad_scale, char* err,
                    size_t errlen) {
  return guarded(err, errlen, [&] {
    std::optional<at::Tensor> scale;
    if (grad_scale) scale = *static_cast<at::Tensor*>(grad_scale);
    at::_fused_adamw_(list(params, n), list(grads, n), list(exp_avgs, n),
                      list(exp_avg_sqs, n), {}, list(steps, n), lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false, scale,
                      std::nullopt);
  });
}

// *out = a new at::Tensor*: the L2 norm of all n tensors together (0-d, their dtype).
int dim_foreach_norm(void** ts, int n, void** out, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    std::vector<at::Tensor> norms = at::_foreach_norm(list(ts, n), 2);
    *out = new at::Tensor(at::linalg_vector_norm(at::stack(norms), 2));
  });
}

// a[i] += w * (b[i] - a[i]) for all i.
int dim_foreach_lerp(void** a, void** b, int n, double w, char* err, size_t errlen) {
  return guarded(err, errlen, [&] { at::_foreach_lerp_(list(a, n), list(b, n), w); });
}

// a[i] += v for all i.
int dim_foreach_add_scalar(void** a, int n, double v, char* err, size_t errlen) {
  return guarded(err, errlen, [&] { at::_foreach_add_(list(a, n), v); });
}

// Drops the gradients of n leaves (PyTorch's zero_grad(set_to_none=True)):
// the next backward then writes fresh gradients instead of adding to zeros.
int dim_clear_grads(void** ts, int n, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    for (int i = 0; i < n; ++i) static_cast<at::Tensor*>(ts[i])->mutable_grad().reset();
  });
}

}  // extern "C"
