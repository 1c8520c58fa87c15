// Fused AdamW step on the CPU (pure C++, no torch): one pass over each parameter reads param, grad, exp_avg and
// exp_avg_sq once and writes param, exp_avg and exp_avg_sq once (28 bytes per fp32 element, the memory floor of
// an out-of-place-free AdamW), instead of the ~10 passes of an op-by-op implementation.
//
// Math (the same as torch.optim.AdamW, amsgrad=False, maximize=False), per element, with step t >= 1 already
// counted for this tensor:
//   g     = grad * grad_scale                              (grad_scale folds a gradient clip into the step)
//   p     = p * (1 - lr * weight_decay)                    (decoupled weight decay)
//   m     = lerp(m, g, 1 - beta1)
//   v     = v * beta2 + (1 - beta2) * g * g
//   denom = sqrt(v) / sqrt(1 - beta2^t) + eps
//   p     = p - lr / (1 - beta1^t) * m / denom
// The per-tensor scalars are computed in double and rounded to float, as PyTorch does with its Python floats.
// Parameters and gradients are fp32 or bf16 (same dtype); the optimizer state is always fp32, so a bf16 model
// keeps full-precision moments and only the parameter is rounded (to nearest even) after each update.
//
// Work is cut into chunks of kAdamWChunk elements over all tensors of a call; OpenMP runs the chunks in parallel.
#pragma once

#include <cstdint>

#include "core/grpo_loss.h"  // FloatType, bf16 conversions

namespace r1engine {

constexpr int64_t kAdamWChunk = 1 << 16;

struct AdamWHyper {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
};

// One parameter tensor: contiguous buffers of `numel` elements. `step` is the step count including this step.
struct AdamWTensor {
  void* param = nullptr;         // dtype
  const void* grad = nullptr;    // dtype
  float* exp_avg = nullptr;      // fp32
  float* exp_avg_sq = nullptr;   // fp32
  int64_t numel = 0;
  int64_t step = 1;
  FloatType dtype = FloatType::kF32;
};

// Updates every tensor in place. Tensors must not overlap each other.
void adamw_step(const AdamWTensor* tensors, int64_t count, const AdamWHyper& h, float grad_scale);

// One gradient buffer for grad_sq_norm.
struct GradView {
  const void* data = nullptr;
  int64_t numel = 0;
  FloatType dtype = FloatType::kF32;
};

// sum over all tensors of sum(g^2), accumulated in double per chunk and reduced in a fixed order (the result does
// not depend on the number of threads). Non-finite gradients give inf or NaN.
double grad_sq_norm(const GradView* grads, int64_t count);

}  // namespace r1engine
