// torch.ops.r1engine.adamw_step_ / grad_sq_norm: the fused AdamW step and gradient norm of csrc/core/adamw.* over
// lists of CPU tensors (used by r1engine.optim.FusedAdamW). Parameters are updated in place.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <vector>

#include "core/adamw.h"

namespace {

using at::Tensor;
using r1engine::FloatType;

FloatType check_float(const Tensor& t, const char* name, int64_t i) {
  TORCH_CHECK(t.device().is_cpu(), name, "[", i, "]: expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name, "[", i,
              "]: expected dtype float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, "[", i, "]: expected a contiguous tensor");
  return t.scalar_type() == at::kFloat ? FloatType::kF32 : FloatType::kBF16;
}

void check_state(const Tensor& s, const char* name, int64_t i, const Tensor& param) {
  TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.is_contiguous(), name, "[", i,
              "]: expected a contiguous float32 CPU tensor, got ", s.scalar_type(), " on ", s.device());
  TORCH_CHECK(s.numel() == param.numel(), name, "[", i, "]: expected ", param.numel(), " elements (as params[", i,
              "]), got ", s.numel());
}

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::IntArrayRef steps, double lr, double beta1, double beta2, double eps, double weight_decay,
                    double grad_scale) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(exp_avgs.size()) == n &&
                  static_cast<int64_t>(exp_avg_sqs.size()) == n && static_cast<int64_t>(steps.size()) == n,
              "adamw_step_: expected params, grads, exp_avgs, exp_avg_sqs and steps of equal length, got ", n, ", ",
              grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", steps.size());
  TORCH_CHECK(lr >= 0.0, "lr: expected a value >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, "beta1: expected a value in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, "beta2: expected a value in [0, 1), got ", beta2);
  TORCH_CHECK(eps >= 0.0, "eps: expected a value >= 0, got ", eps);
  std::vector<r1engine::AdamWTensor> batch(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const FloatType dt = check_float(params[i], "params", i);
    check_float(grads[i], "grads", i);
    TORCH_CHECK(grads[i].scalar_type() == params[i].scalar_type() && grads[i].numel() == params[i].numel(),
                "grads[", i, "]: expected ", params[i].numel(), " elements of dtype ", params[i].scalar_type(),
                " (as params[", i, "]), got ", grads[i].numel(), " of ", grads[i].scalar_type());
    check_state(exp_avgs[i], "exp_avgs", i, params[i]);
    check_state(exp_avg_sqs[i], "exp_avg_sqs", i, params[i]);
    TORCH_CHECK(steps[i] >= 1, "steps[", i, "]: expected a step count >= 1 (including this step), got ", steps[i]);
    batch[i] = {params[i].data_ptr(), grads[i].data_ptr(),   exp_avgs[i].data_ptr<float>(),
                exp_avg_sqs[i].data_ptr<float>(), params[i].numel(), steps[i], dt};
  }
  r1engine::AdamWHyper h{lr, beta1, beta2, eps, weight_decay};
  r1engine::adamw_step(batch.data(), n, h, static_cast<float>(grad_scale));
}

double grad_sq_norm_cpu(at::TensorList grads) {
  std::vector<r1engine::GradView> views(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const FloatType dt = check_float(grads[i], "grads", static_cast<int64_t>(i));
    views[i] = {grads[i].data_ptr(), grads[i].numel(), dt};
  }
  return r1engine::grad_sq_norm(views.data(), static_cast<int64_t>(views.size()));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1engine, m) {
  m.def(
      "adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "int[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, float grad_scale) -> ()");
  // Sum of squares (not the norm) so that several calls, e.g. per dtype, can be added before the sqrt.
  m.def("grad_sq_norm(Tensor[] grads) -> float");
}

TORCH_LIBRARY_IMPL(r1engine, CPU, m) {
  m.impl("adamw_step_", &adamw_step_cpu);
}

TORCH_LIBRARY_IMPL(r1engine, CompositeExplicitAutograd, m) {
  m.impl("grad_sq_norm", &grad_sq_norm_cpu);
}
