// SIMD building blocks shared by the CPU kernels (csrc/core/*.cpp): scalar and 8-lane fp32 loads/stores of fp32
// and bf16 buffers (bf16 rounded to nearest even on store), a vectorized exp, horizontal max/sum and an 8x8
// transpose-reduce. Everything is inline; R1_SIMD_AVX2 is defined when the compiler targets AVX2 + FMA, and every
// kernel keeps a scalar path for other targets.
#pragma once

#include <cstdint>

#include "core/grpo_loss.h"  // bf16_to_float, float_to_bf16

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define R1_SIMD_AVX2 1
#endif

namespace r1engine {
namespace simd {

inline float load_scalar(const float* p, int64_t i) { return p[i]; }
inline float load_scalar(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
inline void store_scalar(float* p, int64_t i, float x) { p[i] = x; }
inline void store_scalar(uint16_t* p, int64_t i, float x) { p[i] = float_to_bf16(x); }

#ifdef R1_SIMD_AVX2
// exp(x) for fp32 lanes: Cephes-style range reduction + degree-6 polynomial (~1e-7 relative error).
// Inputs below -87.3 give exactly 0 (so -inf logits contribute nothing); NaN propagates.
inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3365447505f);
  const __m256 hi = _mm256_set1_ps(88.3762626647f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(lo, x);  // second operand returned for NaN: NaN kept
  x = _mm256_min_ps(hi, x);
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 r2 = _mm256_mul_ps(r, r);
  p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
  e = _mm256_slli_epi32(e, 23);
  const __m256 res = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(underflow, res);
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline void store8(float* p, __m256 x, bool stream = false) {
  if (stream)
    _mm256_stream_ps(p, x);
  else
    _mm256_storeu_ps(p, x);
}
// Round to nearest even; NaN stays NaN (quieted, as float_to_bf16).
inline void store8(uint16_t* p, __m256 x, bool stream = false) {
  __m256i b = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(0x40));
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  b = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(quiet), nan));
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  if (stream)
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), packed);
  else
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

#ifdef R1_SIMD_AVX2
// The 8 horizontal sums of rows[0..7] as one vector: lane j = sum of the lanes of rows[j].
inline __m256 hsum8x8(const __m256 rows[8]) {
  const __m256 a01 = _mm256_hadd_ps(rows[0], rows[1]), a23 = _mm256_hadd_ps(rows[2], rows[3]);
  const __m256 a45 = _mm256_hadd_ps(rows[4], rows[5]), a67 = _mm256_hadd_ps(rows[6], rows[7]);
  const __m256 b0123 = _mm256_hadd_ps(a01, a23), b4567 = _mm256_hadd_ps(a45, a67);
  // b0123 = [r0 lo, r1 lo, r2 lo, r3 lo | r0 hi, r1 hi, r2 hi, r3 hi] (partial sums of 128-bit halves)
  const __m256 lo = _mm256_permute2f128_ps(b0123, b4567, 0x20), hi = _mm256_permute2f128_ps(b0123, b4567, 0x31);
  return _mm256_add_ps(lo, hi);
}
#endif

}  // namespace simd
}  // namespace r1engine
