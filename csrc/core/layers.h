// Fused element-wise parts of a decoder layer on the CPU (pure C++, no torch): RMSNorm, SwiGLU and RoPE, forward
// and backward. Each kernel reads its inputs once and writes its outputs once; the backward passes recompute what
// an op-by-op autograd graph would have saved (normalized rows, silu(gate)), so that training keeps only the
// inputs (plus one fp32 rstd per row for RMSNorm) as activations.
//
// Contract (the PyTorch oracles are r1engine/ops/{rms_norm,swiglu,rope}.py `*_reference`):
//   rms_norm_fwd:  rstd_i = 1 / sqrt(mean_j x_ij^2 + eps),  y_ij = (x_ij * rstd_i) * w_j
//   rms_norm_bwd:  xhat = x * rstd, gw = dy * w,
//                  dx_ij = rstd_i * (gw_ij - xhat_ij * mean_j(gw_ij * xhat_ij)),  dw_j = sum_i dy_ij * xhat_ij
//   swiglu_fwd:    y = silu(g) * u = g * sigmoid(g) * u
//   swiglu_bwd:    dg = dy * u * s * (1 + g * (1 - s)),  du = dy * g * s   (s = sigmoid(g))
//   rope_fwd:      per row r (token) and head h, with half = D / 2, lo = x[:half], hi = x[half:]:
//                  y_lo = lo * cos_lo - hi * sin_lo,  y_hi = hi * cos_hi + lo * sin_hi      (NeoX rotate_half)
//   rope_bwd:      the transpose: dx_lo = g_lo * cos_lo + g_hi * sin_hi,  dx_hi = g_hi * cos_hi - g_lo * sin_lo
// x / y / dy / dx / gate / up buffers are contiguous and of `dtype` (fp32, or bf16 stored as uint16_t, rounded to
// nearest even on store); weight, rstd, dweight, cos and sin are contiguous fp32. All arithmetic is in fp32.
// OpenMP runs rows (RMSNorm, RoPE) or fixed chunks of elements (SwiGLU) in parallel; inner loops use 8-lane AVX2
// when compiled with it. Results do not depend on the number of threads (dweight is reduced over fixed row blocks
// in a fixed order).
#pragma once

#include <cstdint>

#include "core/grpo_loss.h"  // FloatType, bf16 conversions

namespace r1engine {

// x, y: [rows, cols] of dtype; weight: [cols]; rstd: [rows] (written).
void rms_norm_fwd(const void* x, FloatType dtype, int64_t rows, int64_t cols, const float* weight, float eps,
                  void* y, float* rstd);

// dy, x, dx: [rows, cols] of dtype; weight: [cols]; rstd: [rows] from rms_norm_fwd; dweight: [cols] (written, not
// accumulated into).
void rms_norm_bwd(const void* dy, const void* x, FloatType dtype, int64_t rows, int64_t cols, const float* weight,
                  const float* rstd, void* dx, float* dweight);

// gate, up, y: n elements of dtype.
void swiglu_fwd(const void* gate, const void* up, FloatType dtype, int64_t n, void* y);

// dy, gate, up, dgate, dup: n elements of dtype.
void swiglu_bwd(const void* dy, const void* gate, const void* up, FloatType dtype, int64_t n, void* dgate,
                void* dup);

// x, y: [rows, heads, dim] of dtype; cos, sin: [rows, dim]. dim must be even. For the backward pass x is the
// incoming gradient and y the gradient of the input (transpose = true).
void rope_apply(const void* x, FloatType dtype, int64_t rows, int64_t heads, int64_t dim, const float* cos,
                const float* sin, bool transpose, void* y);

}  // namespace r1engine
