// Fused RMSNorm / SwiGLU / RoPE, CPU kernels. See layers.h for the contract.
//
// All three are memory-bound: the point is to touch each input byte once per pass (RMSNorm: 2 reads of the row,
// the second from L1; SwiGLU and RoPE: one read and one write per element) instead of the 3-8 passes, and the
// fp32 temporaries, of the op-by-op PyTorch graph. Rows are contiguous; bf16 rows are widened to fp32 in
// registers. The RoPE kernel uses separate multiplies and adds (no FMA) so that fp32 results round exactly like
// PyTorch's `x * cos + rotate_half(x) * sin`.
#include "core/layers.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/simd.h"

namespace r1engine {
namespace {

using namespace simd;  // NOLINT(build/namespaces)

constexpr int64_t kParallelMin = 1 << 15;  // below this many elements a call runs on one thread
constexpr int64_t kSwigluChunk = 1 << 13;  // elements per SwiGLU work item
constexpr int64_t kMaxDwBlocks = 64;       // row blocks of the RMSNorm dweight reduction
constexpr int64_t kMinDwRows = 16;         // at least this many rows per block

inline float sigmoid1(float g) {
  const float e = std::exp(-std::fabs(g));
  const float inv = 1.0f / (1.0f + e);
  return g < 0.0f ? e * inv : inv;
}

#ifdef R1_SIMD_AVX2
// sigmoid(g) = 1 / (1 + exp(-g)) through e = exp(-|g|) (never overflows): g >= 0 -> 1 / (1 + e), else e / (1 + e).
inline __m256 sigmoid8(__m256 g) {
  const __m256 neg_abs = _mm256_or_ps(g, _mm256_set1_ps(-0.0f));
  const __m256 e = exp256(neg_abs);
  const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
  const __m256 neg = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ);
  return _mm256_blendv_ps(inv, _mm256_mul_ps(e, inv), neg);
}
#endif

// ------------------------------------------------------------------------------------------------------ RMSNorm

template <class T>
float sum_sq(const T* x, int64_t n) {
  int64_t j = 0;
  float total = 0.0f;
#ifdef R1_SIMD_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; j + 32 <= n; j += 32) {
    const __m256 x0 = load8(x + j), x1 = load8(x + j + 8), x2 = load8(x + j + 16), x3 = load8(x + j + 24);
    a0 = _mm256_fmadd_ps(x0, x0, a0);
    a1 = _mm256_fmadd_ps(x1, x1, a1);
    a2 = _mm256_fmadd_ps(x2, x2, a2);
    a3 = _mm256_fmadd_ps(x3, x3, a3);
  }
  for (; j + 8 <= n; j += 8) {
    const __m256 x0 = load8(x + j);
    a0 = _mm256_fmadd_ps(x0, x0, a0);
  }
  total = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
  for (; j < n; ++j) {
    const float v = load_scalar(x, j);
    total += v * v;
  }
  return total;
}

// sum_j dy_j * w_j * x_j
template <class T>
float dot_gwx(const T* dy, const T* x, const float* w, int64_t n) {
  int64_t j = 0;
  float total = 0.0f;
#ifdef R1_SIMD_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  for (; j + 16 <= n; j += 16) {
    a0 = _mm256_fmadd_ps(_mm256_mul_ps(load8(dy + j), _mm256_loadu_ps(w + j)), load8(x + j), a0);
    a1 = _mm256_fmadd_ps(_mm256_mul_ps(load8(dy + j + 8), _mm256_loadu_ps(w + j + 8)), load8(x + j + 8), a1);
  }
  for (; j + 8 <= n; j += 8) {
    a0 = _mm256_fmadd_ps(_mm256_mul_ps(load8(dy + j), _mm256_loadu_ps(w + j)), load8(x + j), a0);
  }
  total = hsum(_mm256_add_ps(a0, a1));
#endif
  for (; j < n; ++j) total += load_scalar(dy, j) * w[j] * load_scalar(x, j);
  return total;
}

template <class T>
void rms_norm_fwd_impl(const T* x, int64_t rows, int64_t cols, const float* w, float eps, T* y, float* rstd) {
  const float inv_cols = 1.0f / static_cast<float>(cols);
#pragma omp parallel for schedule(static) if (rows * cols >= kParallelMin)
  for (int64_t i = 0; i < rows; ++i) {
    const T* xi = x + i * cols;
    T* yi = y + i * cols;
    const float r = 1.0f / std::sqrt(sum_sq(xi, cols) * inv_cols + eps);
    rstd[i] = r;
    int64_t j = 0;
#ifdef R1_SIMD_AVX2
    const __m256 rv = _mm256_set1_ps(r);
    for (; j + 8 <= cols; j += 8)
      store8(yi + j, _mm256_mul_ps(_mm256_mul_ps(load8(xi + j), rv), _mm256_loadu_ps(w + j)));
#endif
    for (; j < cols; ++j) store_scalar(yi, j, (load_scalar(xi, j) * r) * w[j]);
  }
}

// One row of the backward: dx, and dy * xhat added into the block's dweight partial `dw`.
template <class T>
inline void rms_norm_bwd_row(const T* dy, const T* x, const float* w, float r, int64_t cols, float inv_cols, T* dx,
                             float* dw) {
  // mean_j(gw_j * xhat_j) = r * dot(gw, x) / cols
  const float c = r * dot_gwx(dy, x, w, cols) * inv_cols;
  int64_t j = 0;
#ifdef R1_SIMD_AVX2
  const __m256 rv = _mm256_set1_ps(r), cv = _mm256_set1_ps(c);
  for (; j + 8 <= cols; j += 8) {
    const __m256 g = load8(dy + j);
    const __m256 xhat = _mm256_mul_ps(load8(x + j), rv);
    const __m256 gw = _mm256_mul_ps(g, _mm256_loadu_ps(w + j));
    store8(dx + j, _mm256_mul_ps(rv, _mm256_fnmadd_ps(xhat, cv, gw)));
    _mm256_storeu_ps(dw + j, _mm256_fmadd_ps(g, xhat, _mm256_loadu_ps(dw + j)));
  }
#endif
  for (; j < cols; ++j) {
    const float g = load_scalar(dy, j);
    const float xhat = load_scalar(x, j) * r;
    store_scalar(dx, j, r * (g * w[j] - xhat * c));
    dw[j] += g * xhat;
  }
}

template <class T>
void rms_norm_bwd_impl(const T* dy, const T* x, int64_t rows, int64_t cols, const float* w, const float* rstd, T* dx,
                       float* dweight) {
  const float inv_cols = 1.0f / static_cast<float>(cols);
  // Row blocks depend on `rows` only, so dweight does not depend on the thread count.
  const int64_t nb = std::max<int64_t>(1, std::min(kMaxDwBlocks, rows / kMinDwRows));
  std::vector<float> partial(static_cast<size_t>(nb * cols), 0.0f);
#pragma omp parallel for schedule(dynamic, 1) if (rows * cols >= kParallelMin)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t begin = rows * b / nb, end = rows * (b + 1) / nb;
    float* dw = partial.data() + b * cols;
    for (int64_t i = begin; i < end; ++i)
      rms_norm_bwd_row(dy + i * cols, x + i * cols, w, rstd[i], cols, inv_cols, dx + i * cols, dw);
  }
  for (int64_t j = 0; j < cols; ++j) dweight[j] = partial[j];
  for (int64_t b = 1; b < nb; ++b) {
    const float* p = partial.data() + b * cols;
    for (int64_t j = 0; j < cols; ++j) dweight[j] += p[j];
  }
}

// ------------------------------------------------------------------------------------------------------ SwiGLU

template <class T>
void swiglu_fwd_range(const T* gate, const T* up, int64_t begin, int64_t end, T* y) {
  int64_t j = begin;
#ifdef R1_SIMD_AVX2
  for (; j + 8 <= end; j += 8) {
    const __m256 g = load8(gate + j);
    store8(y + j, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid8(g)), load8(up + j)));
  }
#endif
  for (; j < end; ++j) {
    const float g = load_scalar(gate, j);
    store_scalar(y, j, (g * sigmoid1(g)) * load_scalar(up, j));
  }
}

template <class T>
void swiglu_bwd_range(const T* dy, const T* gate, const T* up, int64_t begin, int64_t end, T* dgate, T* dup) {
  int64_t j = begin;
#ifdef R1_SIMD_AVX2
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; j + 8 <= end; j += 8) {
    const __m256 g = load8(gate + j), u = load8(up + j), d = load8(dy + j);
    const __m256 s = sigmoid8(g);
    const __m256 silu = _mm256_mul_ps(g, s);
    // dsilu/dg = s * (1 + g * (1 - s))
    const __m256 dsilu = _mm256_mul_ps(s, _mm256_fmadd_ps(g, _mm256_sub_ps(one, s), one));
    store8(dgate + j, _mm256_mul_ps(_mm256_mul_ps(d, u), dsilu));
    store8(dup + j, _mm256_mul_ps(d, silu));
  }
#endif
  for (; j < end; ++j) {
    const float g = load_scalar(gate, j), u = load_scalar(up, j), d = load_scalar(dy, j);
    const float s = sigmoid1(g);
    store_scalar(dgate, j, (d * u) * (s * (1.0f + g * (1.0f - s))));
    store_scalar(dup, j, d * (g * s));
  }
}

template <class F>
void for_chunks(int64_t n, F body) {
  const int64_t nc = (n + kSwigluChunk - 1) / kSwigluChunk;
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t c = 0; c < nc; ++c) body(c * kSwigluChunk, std::min(n, (c + 1) * kSwigluChunk));
}

// ------------------------------------------------------------------------------------------------------ RoPE

// The rotation is computed as two products and a sum, each rounded (no FMA contraction), as PyTorch's op-by-op
// `x * cos + rotate_half(x) * sin` rounds. The compiler may contract a multiply followed by an add into an FMA
// (GCC does so by default, vector intrinsics included); an empty asm on the product hides it from that pass.
inline float rounded(float v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+x"(v));
#endif
  return v;
}
#ifdef R1_SIMD_AVX2
inline __m256 rounded(__m256 v) {
  asm("" : "+x"(v));
  return v;
}
#endif

// One head: out_lo = a_lo * c_lo + sl * a_hi * s1,  out_hi = a_hi * c_hi + sh * a_lo * s2, where forward uses
// (s1, s2) = (sin_lo, sin_hi), (sl, sh) = (-1, +1), and the transpose (s1, s2) = (sin_hi, sin_lo), (+1, -1).
template <class T, bool kTranspose>
inline void rope_head(const T* a, const float* c, const float* s, int64_t half, T* out) {
  const float* s1 = kTranspose ? s + half : s;
  const float* s2 = kTranspose ? s : s + half;
  int64_t j = 0;
#ifdef R1_SIMD_AVX2
  for (; j + 8 <= half; j += 8) {
    const __m256 lo = load8(a + j), hi = load8(a + half + j);
    const __m256 p_lo = rounded(_mm256_mul_ps(lo, _mm256_loadu_ps(c + j)));
    const __m256 q_lo = rounded(_mm256_mul_ps(hi, _mm256_loadu_ps(s1 + j)));
    const __m256 p_hi = rounded(_mm256_mul_ps(hi, _mm256_loadu_ps(c + half + j)));
    const __m256 q_hi = rounded(_mm256_mul_ps(lo, _mm256_loadu_ps(s2 + j)));
    store8(out + j, kTranspose ? _mm256_add_ps(p_lo, q_lo) : _mm256_sub_ps(p_lo, q_lo));
    store8(out + half + j, kTranspose ? _mm256_sub_ps(p_hi, q_hi) : _mm256_add_ps(p_hi, q_hi));
  }
#endif
  for (; j < half; ++j) {
    const float lo = load_scalar(a, j), hi = load_scalar(a, half + j);
    const float sign = kTranspose ? 1.0f : -1.0f;
    const float p_lo = rounded(lo * c[j]), q_lo = rounded((sign * hi) * s1[j]);
    const float p_hi = rounded(hi * c[half + j]), q_hi = rounded((-sign * lo) * s2[j]);
    store_scalar(out, j, p_lo + q_lo);
    store_scalar(out, half + j, p_hi + q_hi);
  }
}

template <class T, bool kTranspose>
void rope_impl(const T* x, int64_t rows, int64_t heads, int64_t dim, const float* cos, const float* sin, T* y) {
  const int64_t half = dim / 2;
#pragma omp parallel for schedule(static) if (rows * heads * dim >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cos + r * dim;
    const float* s = sin + r * dim;
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t off = (r * heads + h) * dim;
      rope_head<T, kTranspose>(x + off, c, s, half, y + off);
    }
  }
}

}  // namespace

void rms_norm_fwd(const void* x, FloatType dtype, int64_t rows, int64_t cols, const float* weight, float eps,
                  void* y, float* rstd) {
  if (dtype == FloatType::kF32)
    rms_norm_fwd_impl(static_cast<const float*>(x), rows, cols, weight, eps, static_cast<float*>(y), rstd);
  else
    rms_norm_fwd_impl(static_cast<const uint16_t*>(x), rows, cols, weight, eps, static_cast<uint16_t*>(y), rstd);
}

void rms_norm_bwd(const void* dy, const void* x, FloatType dtype, int64_t rows, int64_t cols, const float* weight,
                  const float* rstd, void* dx, float* dweight) {
  if (dtype == FloatType::kF32)
    rms_norm_bwd_impl(static_cast<const float*>(dy), static_cast<const float*>(x), rows, cols, weight, rstd,
                      static_cast<float*>(dx), dweight);
  else
    rms_norm_bwd_impl(static_cast<const uint16_t*>(dy), static_cast<const uint16_t*>(x), rows, cols, weight, rstd,
                      static_cast<uint16_t*>(dx), dweight);
}

void swiglu_fwd(const void* gate, const void* up, FloatType dtype, int64_t n, void* y) {
  if (dtype == FloatType::kF32) {
    const auto *g = static_cast<const float*>(gate), *u = static_cast<const float*>(up);
    auto* out = static_cast<float*>(y);
    for_chunks(n, [&](int64_t b, int64_t e) { swiglu_fwd_range(g, u, b, e, out); });
  } else {
    const auto *g = static_cast<const uint16_t*>(gate), *u = static_cast<const uint16_t*>(up);
    auto* out = static_cast<uint16_t*>(y);
    for_chunks(n, [&](int64_t b, int64_t e) { swiglu_fwd_range(g, u, b, e, out); });
  }
}

void swiglu_bwd(const void* dy, const void* gate, const void* up, FloatType dtype, int64_t n, void* dgate,
                void* dup) {
  if (dtype == FloatType::kF32) {
    const auto *d = static_cast<const float*>(dy), *g = static_cast<const float*>(gate),
               *u = static_cast<const float*>(up);
    auto *dg = static_cast<float*>(dgate), *du = static_cast<float*>(dup);
    for_chunks(n, [&](int64_t b, int64_t e) { swiglu_bwd_range(d, g, u, b, e, dg, du); });
  } else {
    const auto *d = static_cast<const uint16_t*>(dy), *g = static_cast<const uint16_t*>(gate),
               *u = static_cast<const uint16_t*>(up);
    auto *dg = static_cast<uint16_t*>(dgate), *du = static_cast<uint16_t*>(dup);
    for_chunks(n, [&](int64_t b, int64_t e) { swiglu_bwd_range(d, g, u, b, e, dg, du); });
  }
}

void rope_apply(const void* x, FloatType dtype, int64_t rows, int64_t heads, int64_t dim, const float* cos,
                const float* sin, bool transpose, void* y) {
  if (dtype == FloatType::kF32) {
    const auto* in = static_cast<const float*>(x);
    auto* out = static_cast<float*>(y);
    if (transpose)
      rope_impl<float, true>(in, rows, heads, dim, cos, sin, out);
    else
      rope_impl<float, false>(in, rows, heads, dim, cos, sin, out);
  } else {
    const auto* in = static_cast<const uint16_t*>(x);
    auto* out = static_cast<uint16_t*>(y);
    if (transpose)
      rope_impl<uint16_t, true>(in, rows, heads, dim, cos, sin, out);
    else
      rope_impl<uint16_t, false>(in, rows, heads, dim, cos, sin, out);
  }
}

}  // namespace r1engine
