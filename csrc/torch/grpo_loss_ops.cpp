// Operator schemas of the fused GRPO loss (shared by the CPU, CUDA and Triton backends) and their CPU
// implementations over the pure C++ kernel in csrc/core/grpo_loss.*. The CUDA implementations of the same
// schemas are registered in csrc/cuda/grpo_loss.cu with TORCH_LIBRARY_IMPL(r1engine, CUDA, m).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "core/grpo_loss.h"

namespace {

using at::Tensor;
using r1engine::FloatType;

FloatType check_logits(const Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "logits: expected a 2-D tensor [N, V], got shape ", logits.sizes());
  TORCH_CHECK(logits.device().is_cpu(), "logits: expected a CPU tensor, got device ", logits.device());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "logits: expected dtype float32 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(logits.size(1) > 0, "logits: expected a non-empty vocabulary dimension, got shape ", logits.sizes());
  TORCH_CHECK(logits.size(0) <= 1 || logits.stride(1) == 1,
              "logits: expected rows with unit stride (call .contiguous()), got strides ", logits.strides());
  TORCH_CHECK(logits.size(0) <= 1 || logits.stride(0) >= logits.size(1),
              "logits: expected non-overlapping rows, got strides ", logits.strides());
  return logits.scalar_type() == at::kFloat ? FloatType::kF32 : FloatType::kBF16;
}

int64_t row_stride(const Tensor& logits) { return logits.size(0) <= 1 ? logits.size(1) : logits.stride(0); }

void check_targets(const Tensor& targets, const Tensor& logits) {
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), "targets: expected shape [N] = [",
              logits.size(0), "], got ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets: expected dtype int64, got ", targets.scalar_type());
  TORCH_CHECK(targets.device().is_cpu(), "targets: expected a CPU tensor, got device ", targets.device());
  TORCH_CHECK(targets.is_contiguous(), "targets: expected a contiguous tensor");
  const int64_t bad = r1engine::first_invalid_target(targets.data_ptr<int64_t>(), targets.size(0), logits.size(1));
  TORCH_CHECK(bad < 0, "targets: expected values in [0, V) = [0, ", logits.size(1), "), got ",
              targets.data_ptr<int64_t>()[bad], " at position ", bad);
}

void check_vec(const Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, ": expected shape [N] = [", n, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected dtype float32, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

void check_temperature(double temperature) {
  TORCH_CHECK(temperature > 0.0, "temperature: expected a positive float, got ", temperature);
}

std::tuple<Tensor, Tensor> token_logprobs_fwd_cpu(const Tensor& logits, const Tensor& targets, double temperature) {
  const FloatType dt = check_logits(logits);
  check_targets(targets, logits);
  check_temperature(temperature);
  const int64_t n = logits.size(0);
  auto opts = logits.options().dtype(at::kFloat);
  Tensor logp = at::empty({n}, opts), lse = at::empty({n}, opts);
  r1engine::token_logprobs_fwd(logits.data_ptr(), dt, n, logits.size(1), row_stride(logits),
                               targets.data_ptr<int64_t>(), static_cast<float>(temperature),
                               logp.data_ptr<float>(), lse.data_ptr<float>());
  return {logp, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> grpo_fwd_cpu(
    const Tensor& logits, const Tensor& targets, const Tensor& advantages, const std::optional<Tensor>& old_logp,
    const std::optional<Tensor>& ref_logp, const Tensor& weights, double temperature, double eps_low,
    double eps_high, double dual_clip, double beta, int64_t kl_estimator) {
  const FloatType dt = check_logits(logits);
  check_targets(targets, logits);
  check_temperature(temperature);
  const int64_t n = logits.size(0);
  check_vec(advantages, "advantages", n);
  check_vec(weights, "weights", n);
  if (old_logp) check_vec(*old_logp, "old_logp", n);
  if (ref_logp) check_vec(*ref_logp, "ref_logp", n);
  TORCH_CHECK(kl_estimator >= 1 && kl_estimator <= 3, "kl_estimator: expected 1, 2 or 3, got ", kl_estimator);
  TORCH_CHECK(dual_clip == 0.0 || dual_clip > 1.0, "dual_clip: expected 0 (off) or a value > 1, got ", dual_clip);
  r1engine::GrpoHyper h;
  h.temperature = static_cast<float>(temperature);
  h.eps_low = static_cast<float>(eps_low);
  h.eps_high = static_cast<float>(eps_high);
  h.dual_clip = static_cast<float>(dual_clip);
  h.beta = static_cast<float>(beta);
  h.kl_estimator = static_cast<int>(kl_estimator);
  auto opts = logits.options().dtype(at::kFloat);
  Tensor loss_tok = at::empty({n}, opts), logp = at::empty({n}, opts), lse = at::empty({n}, opts),
         dlogp = at::empty({n}, opts), ratio = at::empty({n}, opts), kl = at::empty({n}, opts),
         clipped = at::empty({n}, opts);
  r1engine::GrpoOutputs out{loss_tok.data_ptr<float>(), logp.data_ptr<float>(),  lse.data_ptr<float>(),
                            dlogp.data_ptr<float>(),    ratio.data_ptr<float>(), kl.data_ptr<float>(),
                            clipped.data_ptr<float>()};
  r1engine::grpo_fwd(logits.data_ptr(), dt, n, logits.size(1), row_stride(logits), targets.data_ptr<int64_t>(),
                     advantages.data_ptr<float>(), old_logp ? old_logp->data_ptr<float>() : nullptr,
                     ref_logp ? ref_logp->data_ptr<float>() : nullptr, weights.data_ptr<float>(), h, out);
  return {loss_tok, logp, lse, dlogp, ratio, kl, clipped};
}

void check_bwd(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& dlogp,
               double temperature) {
  check_logits(logits);
  check_targets(targets, logits);
  check_temperature(temperature);
  check_vec(lse, "lse", logits.size(0));
  check_vec(dlogp, "dlogp", logits.size(0));
}

Tensor logprobs_bwd_cpu(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& dlogp,
                        double temperature) {
  check_bwd(logits, targets, lse, dlogp, temperature);
  const FloatType dt = logits.scalar_type() == at::kFloat ? FloatType::kF32 : FloatType::kBF16;
  Tensor grad = at::empty(logits.sizes(), logits.options());
  r1engine::logprobs_bwd(logits.data_ptr(), dt, logits.size(0), logits.size(1), row_stride(logits),
                         targets.data_ptr<int64_t>(), lse.data_ptr<float>(), dlogp.data_ptr<float>(),
                         static_cast<float>(temperature), grad.data_ptr(), logits.size(1));
  return grad;
}

void logprobs_bwd_inplace_cpu(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& dlogp,
                              double temperature) {
  check_bwd(logits, targets, lse, dlogp, temperature);
  const FloatType dt = logits.scalar_type() == at::kFloat ? FloatType::kF32 : FloatType::kBF16;
  r1engine::logprobs_bwd(logits.data_ptr(), dt, logits.size(0), logits.size(1), row_stride(logits),
                         targets.data_ptr<int64_t>(), lse.data_ptr<float>(), dlogp.data_ptr<float>(),
                         static_cast<float>(temperature), logits.data_ptr(), row_stride(logits));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1engine, m) {
  m.def("token_logprobs_fwd(Tensor logits, Tensor targets, float temperature) -> (Tensor logp, Tensor lse)");
  m.def(
      "grpo_fwd(Tensor logits, Tensor targets, Tensor advantages, Tensor? old_logp, Tensor? ref_logp, "
      "Tensor weights, float temperature, float eps_low, float eps_high, float dual_clip, float beta, "
      "int kl_estimator) -> (Tensor loss_tok, Tensor logp, Tensor lse, Tensor dlogp, Tensor ratio, Tensor kl, "
      "Tensor clipped)");
  m.def("logprobs_bwd(Tensor logits, Tensor targets, Tensor lse, Tensor dlogp, float temperature) -> Tensor");
  m.def("logprobs_bwd_(Tensor(a!) logits, Tensor targets, Tensor lse, Tensor dlogp, float temperature) -> ()");
}

TORCH_LIBRARY_IMPL(r1engine, CPU, m) {
  m.impl("token_logprobs_fwd", &token_logprobs_fwd_cpu);
  m.impl("grpo_fwd", &grpo_fwd_cpu);
  m.impl("logprobs_bwd", &logprobs_bwd_cpu);
  m.impl("logprobs_bwd_", &logprobs_bwd_inplace_cpu);
}
