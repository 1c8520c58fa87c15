// Operator schemas of the vocabulary passes of the GRPO-family losses (shared by the CPU, CUDA and Triton backends)
// and their CPU implementations over the pure C++ kernel in csrc/core/grpo_loss.*. The CUDA implementations of the same
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

const float* opt_vec(const std::optional<Tensor>& t, const char* name, int64_t n) {
  if (!t) return nullptr;
  check_vec(*t, name, n);
  return t->data_ptr<float>();
}

std::tuple<Tensor, Tensor, Tensor> logprobs_fwd_cpu(const Tensor& logits, const Tensor& targets,
                                                    const std::optional<Tensor>& live, double temperature,
                                                    bool entropy) {
  const FloatType dt = check_logits(logits);
  check_targets(targets, logits);
  check_temperature(temperature);
  const int64_t n = logits.size(0);
  const float* live_ptr = opt_vec(live, "live", n);
  auto opts = logits.options().dtype(at::kFloat);
  Tensor logp = at::empty({n}, opts), lse = at::empty({n}, opts);
  Tensor ent = entropy ? at::empty({n}, opts) : at::zeros({n}, opts);
  r1engine::token_logprobs_fwd(logits.data_ptr(), dt, n, logits.size(1), row_stride(logits),
                               targets.data_ptr<int64_t>(), live_ptr, static_cast<float>(temperature),
                               logp.data_ptr<float>(), lse.data_ptr<float>(),
                               entropy ? ent.data_ptr<float>() : nullptr);
  return {logp, lse, ent};
}

struct BwdArgs {
  FloatType dtype;
  const float* dent;
  const float* ent;
};

BwdArgs check_bwd(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& dlogp,
                  const std::optional<Tensor>& dentropy, const std::optional<Tensor>& entropy, double temperature) {
  const FloatType dt = check_logits(logits);
  check_targets(targets, logits);
  check_temperature(temperature);
  const int64_t n = logits.size(0);
  check_vec(lse, "lse", n);
  check_vec(dlogp, "dlogp", n);
  TORCH_CHECK(dentropy.has_value() == entropy.has_value(), "dentropy and entropy: expected both or neither");
  return {dt, opt_vec(dentropy, "dentropy", n), opt_vec(entropy, "entropy", n)};
}

Tensor logprobs_bwd_cpu(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& dlogp,
                        const std::optional<Tensor>& dentropy, const std::optional<Tensor>& entropy,
                        double temperature) {
  const BwdArgs a = check_bwd(logits, targets, lse, dlogp, dentropy, entropy, temperature);
  Tensor grad = at::empty(logits.sizes(), logits.options());
  r1engine::logprobs_bwd(logits.data_ptr(), a.dtype, logits.size(0), logits.size(1), row_stride(logits),
                         targets.data_ptr<int64_t>(), lse.data_ptr<float>(), dlogp.data_ptr<float>(), a.dent, a.ent,
                         static_cast<float>(temperature), grad.data_ptr(), logits.size(1));
  return grad;
}

void logprobs_bwd_inplace_cpu(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& dlogp,
                              const std::optional<Tensor>& dentropy, const std::optional<Tensor>& entropy,
                              double temperature) {
  const BwdArgs a = check_bwd(logits, targets, lse, dlogp, dentropy, entropy, temperature);
  r1engine::logprobs_bwd(logits.data_ptr(), a.dtype, logits.size(0), logits.size(1), row_stride(logits),
                         targets.data_ptr<int64_t>(), lse.data_ptr<float>(), dlogp.data_ptr<float>(), a.dent, a.ent,
                         static_cast<float>(temperature), logits.data_ptr(), row_stride(logits));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1engine, m) {
  m.def(
      "logprobs_fwd(Tensor logits, Tensor targets, Tensor? live, float temperature, bool entropy) -> "
      "(Tensor logp, Tensor lse, Tensor entropy)");
  m.def(
      "logprobs_bwd(Tensor logits, Tensor targets, Tensor lse, Tensor dlogp, Tensor? dentropy, Tensor? entropy, "
      "float temperature) -> Tensor");
  m.def(
      "logprobs_bwd_(Tensor(a!) logits, Tensor targets, Tensor lse, Tensor dlogp, Tensor? dentropy, "
      "Tensor? entropy, float temperature) -> ()");
}

TORCH_LIBRARY_IMPL(r1engine, CPU, m) {
  m.impl("logprobs_fwd", &logprobs_fwd_cpu);
  m.impl("logprobs_bwd", &logprobs_bwd_cpu);
  m.impl("logprobs_bwd_", &logprobs_bwd_inplace_cpu);
}
