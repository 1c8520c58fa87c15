// Fused GRPO loss on materialized logits, CPU kernel (pure C++, no torch).
//
// Contract shared by the C++ CPU, CUDA and Triton backends (see r1engine/ops/backends/torch_ref.py for the
// pure-PyTorch oracle):
//   token_logprobs_fwd: lse_i = logsumexp_v(x[i, v] / T) with one online (running max + rescaled sum) pass
//                       over each row, logp_i = x[i, t_i] / T - lse_i.
//   grpo_fwd:           the same, plus the per-token clipped surrogate / KL / weighting and the analytic
//                       d loss_tok_i / d logp_i, skipping rows whose weight is 0.
//   logprobs_bwd:       grad[i, v] = (onehot(t_i)[v] - exp(x[i, v] / T - lse_i)) * dlogp_i / T, written in the
//                       logits' dtype; `grad` may alias `logits` (in-place backward, no second [N, V] buffer).
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

struct GrpoHyper {
  float temperature = 1.0f;
  float eps_low = 0.2f;
  float eps_high = 0.2f;
  float dual_clip = 0.0f;  // > 1 enables dual-clip for negative advantages; 0 = off
  float beta = 0.0f;       // KL coefficient
  int kl_estimator = 3;    // 1, 2 or 3 (Schulman's k1/k2/k3)
};

// Per-token results of the GRPO math given logp (used by grpo_fwd and exposed for tests/other kernels).
struct GrpoToken {
  float loss = 0.0f;     // w * (-s + beta * kl)
  float dlogp = 0.0f;    // d loss / d logp
  float ratio = 1.0f;    // exp(logp - old_logp)
  float kl = 0.0f;       // KL estimate (0 without ref or with beta == 0)
  float clipped = 0.0f;  // 1 when the (dual-)clip is active
};

// has_old == false: on-policy step (ratio 1, d ratio / d logp = 1). has_ref == false: no KL term.
GrpoToken grpo_token(float logp, float advantage, bool has_old, float old_logp, bool has_ref, float ref_logp,
                     float weight, const GrpoHyper& h);

// Index of the first target outside [0, v), or -1 when all are valid.
int64_t first_invalid_target(const int64_t* targets, int64_t n, int64_t v);

// Index of the first row whose lse is not finite (NaN/inf logits, or a row that is entirely -inf), or -1.
// Rows with weights[i] == 0 are ignored when weights is non-null.
int64_t first_nonfinite(const float* lse, const float* weights, int64_t n);

void token_logprobs_fwd(const void* logits, FloatType dtype, int64_t n, int64_t v, int64_t row_stride,
                        const int64_t* targets, float temperature, float* logp, float* lse);

struct GrpoOutputs {
  float* loss_tok;
  float* logp;
  float* lse;
  float* dlogp;
  float* ratio;
  float* kl;
  float* clipped;
};

// advantages, weights: [n]; old_logp / ref_logp: [n] or nullptr.
void grpo_fwd(const void* logits, FloatType dtype, int64_t n, int64_t v, int64_t row_stride,
              const int64_t* targets, const float* advantages, const float* old_logp, const float* ref_logp,
              const float* weights, const GrpoHyper& h, const GrpoOutputs& out);

// grad has the logits' dtype; it may be the same buffer as logits (then grad_row_stride must equal row_stride).
void logprobs_bwd(const void* logits, FloatType dtype, int64_t n, int64_t v, int64_t row_stride,
                  const int64_t* targets, const float* lse, const float* dlogp, float temperature, void* grad,
                  int64_t grad_row_stride);

}  // namespace r1engine
