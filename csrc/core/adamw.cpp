// Fused AdamW step and gradient norm, CPU kernels. See adamw.h for the contract.
//
// The step is memory-bound (7 streams of 4 bytes per fp32 element, ~10 flops), so the kernel's job is to touch
// each byte once: one 8-lane AVX2 pass per chunk does the whole update with the moments kept in registers. The
// division by sqrt(1 - beta2^t) is a true division (not a multiply by the reciprocal) so that results round like
// PyTorch's op-by-op AdamW.
#include "core/adamw.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/simd.h"

namespace r1engine {
namespace {

using namespace simd;  // NOLINT(build/namespaces)

// Per-tensor scalars, rounded to float once.
struct StepScalars {
  float decay;       // 1 - lr * weight_decay
  float w1;          // 1 - beta1 (the lerp weight)
  float beta2;
  float omb2;        // 1 - beta2
  float bc2_sqrt;    // sqrt(1 - beta2^t)
  float eps;
  float step_size;   // lr / (1 - beta1^t)
  float grad_scale;
};

StepScalars scalars_for(const AdamWHyper& h, int64_t step, float grad_scale) {
  const double t = static_cast<double>(step);
  StepScalars s;
  s.decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  s.w1 = static_cast<float>(1.0 - h.beta1);
  s.beta2 = static_cast<float>(h.beta2);
  s.omb2 = static_cast<float>(1.0 - h.beta2);
  s.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(h.beta2, t)));
  s.eps = static_cast<float>(h.eps);
  s.step_size = static_cast<float>(h.lr / (1.0 - std::pow(h.beta1, t)));
  s.grad_scale = grad_scale;
  return s;
}

// The update of one element (scalar path and vector tails). lerp as in ATen: the form depends on |weight| < 0.5.
template <class T>
inline void update1(T* param, const T* grad, float* m, float* v, int64_t i, const StepScalars& s) {
  const float g = load_scalar(grad, i) * s.grad_scale;
  const float p = load_scalar(param, i) * s.decay;
  const float mi = s.w1 < 0.5f ? m[i] + s.w1 * (g - m[i]) : g - (g - m[i]) * (1.0f - s.w1);
  const float vi = v[i] * s.beta2 + s.omb2 * g * g;
  const float denom = std::sqrt(vi) / s.bc2_sqrt + s.eps;
  m[i] = mi;
  v[i] = vi;
  store_scalar(param, i, p - s.step_size * (mi / denom));
}


template <class T>
void update_range(T* param, const T* grad, float* m, float* v, int64_t begin, int64_t end, const StepScalars& s) {
  int64_t i = begin;
#ifdef R1_SIMD_AVX2
  const __m256 gs = _mm256_set1_ps(s.grad_scale), decay = _mm256_set1_ps(s.decay), w1 = _mm256_set1_ps(s.w1),
               omw1 = _mm256_set1_ps(1.0f - s.w1), b2 = _mm256_set1_ps(s.beta2), omb2 = _mm256_set1_ps(s.omb2),
               bc2 = _mm256_set1_ps(s.bc2_sqrt), eps = _mm256_set1_ps(s.eps), ss = _mm256_set1_ps(s.step_size);
  const bool small_w = s.w1 < 0.5f;
  for (; i + 8 <= end; i += 8) {
    const __m256 g = _mm256_mul_ps(load8(grad + i), gs);
    const __m256 p = _mm256_mul_ps(load8(param + i), decay);
    const __m256 m0 = _mm256_loadu_ps(m + i);
    const __m256 d = _mm256_sub_ps(g, m0);
    const __m256 mi = small_w ? _mm256_fmadd_ps(w1, d, m0) : _mm256_fnmadd_ps(d, omw1, g);
    const __m256 vi = _mm256_fmadd_ps(_mm256_mul_ps(omb2, g), g, _mm256_mul_ps(_mm256_loadu_ps(v + i), b2));
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), bc2), eps);
    _mm256_storeu_ps(m + i, mi);
    _mm256_storeu_ps(v + i, vi);
    store8(param + i, _mm256_fnmadd_ps(ss, _mm256_div_ps(mi, denom), p));
  }
#endif
  for (; i < end; ++i) update1(param, grad, m, v, i, s);
}

template <class T>
double sq_sum_range(const T* g, int64_t begin, int64_t end) {
  double total = 0.0;
  int64_t i = begin;
#ifdef R1_SIMD_AVX2
  // fp32 lanes over blocks of 1024 elements (32 adds per lane), then into the double total.
  while (i + 32 <= end) {
    const int64_t block_end = std::min(end, i + 1024);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 32 <= block_end; i += 32) {
      const __m256 x0 = load8(g + i), x1 = load8(g + i + 8), x2 = load8(g + i + 16), x3 = load8(g + i + 24);
      a0 = _mm256_fmadd_ps(x0, x0, a0);
      a1 = _mm256_fmadd_ps(x1, x1, a1);
      a2 = _mm256_fmadd_ps(x2, x2, a2);
      a3 = _mm256_fmadd_ps(x3, x3, a3);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (float x : lanes) total += x;
  }
#endif
  for (; i < end; ++i) {
    const double x = load_scalar(g, i);
    total += x * x;
  }
  return total;
}

struct Chunk {
  int64_t tensor, begin, end;
};

template <class NumelOf>
std::vector<Chunk> make_chunks(int64_t count, NumelOf numel_of) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t n = numel_of(t);
    for (int64_t b = 0; b < n; b += kAdamWChunk) chunks.push_back({t, b, std::min(n, b + kAdamWChunk)});
  }
  return chunks;
}

}  // namespace

void adamw_step(const AdamWTensor* tensors, int64_t count, const AdamWHyper& h, float grad_scale) {
  std::vector<StepScalars> sc(static_cast<size_t>(count));
  for (int64_t t = 0; t < count; ++t) sc[t] = scalars_for(h, tensors[t].step, grad_scale);
  const std::vector<Chunk> chunks = make_chunks(count, [&](int64_t t) { return tensors[t].numel; });
  const int64_t nc = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(dynamic, 1) if (nc > 1)
  for (int64_t c = 0; c < nc; ++c) {
    const Chunk& ch = chunks[c];
    const AdamWTensor& x = tensors[ch.tensor];
    if (x.dtype == FloatType::kF32)
      update_range(static_cast<float*>(x.param), static_cast<const float*>(x.grad), x.exp_avg, x.exp_avg_sq,
                   ch.begin, ch.end, sc[ch.tensor]);
    else
      update_range(static_cast<uint16_t*>(x.param), static_cast<const uint16_t*>(x.grad), x.exp_avg, x.exp_avg_sq,
                   ch.begin, ch.end, sc[ch.tensor]);
  }
}

double grad_sq_norm(const GradView* grads, int64_t count) {
  const std::vector<Chunk> chunks = make_chunks(count, [&](int64_t t) { return grads[t].numel; });
  const int64_t nc = static_cast<int64_t>(chunks.size());
  std::vector<double> partial(static_cast<size_t>(nc));
#pragma omp parallel for schedule(dynamic, 1) if (nc > 1)
  for (int64_t c = 0; c < nc; ++c) {
    const Chunk& ch = chunks[c];
    const GradView& g = grads[ch.tensor];
    partial[c] = g.dtype == FloatType::kF32 ? sq_sum_range(static_cast<const float*>(g.data), ch.begin, ch.end)
                                            : sq_sum_range(static_cast<const uint16_t*>(g.data), ch.begin, ch.end);
  }
  double total = 0.0;
  for (double x : partial) total += x;  // fixed order: independent of the thread count
  return total;
}

}  // namespace r1engine
