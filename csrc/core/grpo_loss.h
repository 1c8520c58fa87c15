// The vocabulary passes of the GRPO-family losses on materialized logits, CPU kernel (pure C++, no torch). The O(N)
// loss math on their per-token results is one PyTorch implementation for every backend
// (r1engine/algo/policy_loss.py).
//
// Contract shared by the C++ CPU, CUDA and Triton backends (see r1engine/ops/backends/torch_ref.py for the
// pure-PyTorch oracle):
//   token_logprobs_fwd: lse_i = logsumexp_v(x[i, v] / T) with one online (running max + rescaled sum) pass
//                       over each row, logp_i = x[i, t_i] / T - lse_i, and optionally the entropy, skipping
//                       rows that are not live.
//   logprobs_bwd:       grad[i, v] = (onehot(t_i)[v] - exp(x[i, v] / T - lse_i)) * dlogp_i / T (plus the entropy
//                       term), written in the logits' dtype; `grad` may alias `logits` (in-place backward, no
//                       second [N, V] buffer).
// Logits rows are contiguous (unit stride inside a row); `row_stride` is the distance between rows in
// elements. All accumulation is in fp32 (the per-row sum in double). OpenMP parallelizes over rows.
#pragma once

#include <cstdint>
#include <cstring>

namespace r1engine {

enum class FloatType : int { kF32 = 0, kBF16 = 1 };

// bf16 <-> fp32 by bit manipulation (bf16 is the top half of an IEEE fp32).
inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest even; NaN stays NaN (quiet).
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Index of the first target outside [0, v), or -1 when all are valid.
int64_t first_invalid_target(const int64_t* targets, int64_t n, int64_t v);

// Index of the first row whose lse is not finite (NaN/inf logits, or a row that is entirely -inf), or -1.
// Rows with weights[i] == 0 are ignored when weights is non-null.
int64_t first_nonfinite(const float* lse, const float* weights, int64_t n);

// Rows with live[i] == 0 (live may be null: every row is live) are skipped: logp, lse and entropy are 0 there.
// entropy may be null (not computed); when given, entropy[i] = -sum_v p_v log p_v of softmax(x[i] / T), from the
// same streaming pass (a running sum of exp(z - m) * z beside the running sum of exp(z - m)).
void token_logprobs_fwd(const void* logits, FloatType dtype, int64_t n, int64_t v, int64_t row_stride,
                        const int64_t* targets, const float* live, float temperature, float* logp, float* lse,
                        float* entropy);

// grad[i, v] = (onehot(t_i)[v] - p_v) * dlogp_i / T - dentropy_i * p_v * (z_v - lse_i + entropy_i) / T, with
// z = x / T and p = exp(z - lse): the gradient of sum_i dlogp_i * logp_i + dentropy_i * entropy_i. dentropy and
// entropy may be null (no entropy term). Rows whose dlogp and dentropy are both 0 are zero-filled without reading
// the logits. grad has the logits' dtype; it may be the same buffer as logits (then grad_row_stride must equal
// row_stride).
void logprobs_bwd(const void* logits, FloatType dtype, int64_t n, int64_t v, int64_t row_stride,
                  const int64_t* targets, const float* lse, const float* dlogp, const float* dentropy,
                  const float* entropy, float temperature, void* grad, int64_t grad_row_stride);

}  // namespace r1engine
