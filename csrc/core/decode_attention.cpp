// Decode-step attention, CPU kernel. See decode_attention.h for the contract.
//
// One task per (row, KV head) handles the query heads that share that KV head. Scores: keys in blocks of 8, each
// key row multiplied lane-wise with the query and the 8 partial vectors reduced together (one transpose-reduce per
// 8 keys instead of a horizontal sum per dot product). Softmax with a vectorized exp. Values: one FMA per 8 lanes
// per key, into fp32 accumulators. The AVX2 path needs head_dim % 8 == 0; other sizes take the scalar path.
#include "core/decode_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/simd.h"

namespace r1engine {
namespace {

using namespace simd;  // NOLINT(build/namespaces)

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Scratch {
  std::vector<float> q, scores, acc;  // [group, d], [group, n], [group, d]
};

// scores[g * n + j] = q_g . k_j (q already scaled)
template <typename T>
void scores_scalar(const float* q, const T* k, int64_t group, int64_t n, int64_t d, float* scores) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t g = 0; g < group; ++g) {
      float s = 0.0f;
      for (int64_t i = 0; i < d; ++i) s += q[g * d + i] * load_scalar(k, j * d + i);
      scores[g * n + j] = s;
    }
  }
}

#ifdef R1_SIMD_AVX2
template <typename T>
void scores_avx2(const float* q, const T* k, int64_t group, int64_t n, int64_t d, float* scores) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int64_t g = 0; g < group; ++g) {
      __m256 rows[8];
      for (int jj = 0; jj < 8; ++jj) {
        const T* kj = k + (j + jj) * d;
        __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q + g * d), load8(kj));
        for (int64_t i = 8; i < d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * d + i), load8(kj + i), acc);
        rows[jj] = acc;
      }
      _mm256_storeu_ps(scores + g * n + j, hsum8x8(rows));
    }
  }
  for (; j < n; ++j) {
    for (int64_t g = 0; g < group; ++g) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t i = 0; i < d; i += 8) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * d + i), load8(k + j * d + i), acc);
      }
      scores[g * n + j] = hsum(acc);
    }
  }
}
#endif

// scores -> exp(scores - max) in place; returns the sum
float softmax_numerators(float* s, int64_t n) {
  float mx = kNegInf;
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
  float sum = 0.0f;
  int64_t j = 0;
#ifdef R1_SIMD_AVX2
  const __m256 m8 = _mm256_set1_ps(mx);
  __m256 sum8 = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), m8));
    _mm256_storeu_ps(s + j, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  sum = hsum(sum8);
#endif
  for (; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
  return sum;
}

template <typename T>
void attend_group(const T* q, const T* k, const T* v, T* out, int64_t group, int64_t n, int64_t d, float scale,
                  Scratch& w) {
  w.q.resize(static_cast<size_t>(group * d));
  w.scores.resize(static_cast<size_t>(group * n));
  w.acc.assign(static_cast<size_t>(group * d), 0.0f);
  for (int64_t i = 0; i < group * d; ++i) w.q[i] = load_scalar(q, i) * scale;
#ifdef R1_SIMD_AVX2
  const bool vec = d % 8 == 0;
#else
  const bool vec = false;
#endif
  if (vec) {
#ifdef R1_SIMD_AVX2
    scores_avx2(w.q.data(), k, group, n, d, w.scores.data());
#endif
  } else {
    scores_scalar(w.q.data(), k, group, n, d, w.scores.data());
  }
  float inv[64];  // group <= 64 is checked by the caller
  for (int64_t g = 0; g < group; ++g) inv[g] = 1.0f / softmax_numerators(w.scores.data() + g * n, n);
  for (int64_t j = 0; j < n; ++j) {
    const T* vj = v + j * d;
    for (int64_t g = 0; g < group; ++g) {
      const float p = w.scores[g * n + j];
      float* a = w.acc.data() + g * d;
      int64_t i = 0;
#ifdef R1_SIMD_AVX2
      if (vec) {
        const __m256 p8 = _mm256_set1_ps(p);
        for (; i < d; i += 8) _mm256_storeu_ps(a + i, _mm256_fmadd_ps(p8, load8(vj + i), _mm256_loadu_ps(a + i)));
      }
#endif
      for (; i < d; ++i) a[i] += p * load_scalar(vj, i);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t i = 0; i < d; ++i) store_scalar(out, g * d + i, w.acc[g * d + i] * inv[g]);
  }
}

template <typename T>
void run(const T* q, const T* k, const T* v, const int64_t* n_keys, T* out, const DecodeAttentionShape& s,
         float scale) {
  const int64_t group = s.q_heads / s.kv_heads, d = s.head_dim;
  const int64_t tasks = s.batch * s.kv_heads;
#pragma omp parallel if (tasks * group * s.cache_len * d >= (1 << 16))
  {
    Scratch w;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t b = t / s.kv_heads, h = t % s.kv_heads;
      const int64_t n = std::min(n_keys[b], s.cache_len);
      const int64_t q_off = (b * s.q_heads + h * group) * d;
      if (n <= 0) {
        for (int64_t i = 0; i < group * d; ++i) store_scalar(out, q_off + i, 0.0f);
        continue;
      }
      const int64_t kv_off = (b * s.kv_heads + h) * s.cache_len * d;
      attend_group(q + q_off, k + kv_off, v + kv_off, out + q_off, group, n, d, scale, w);
    }
  }
}

}  // namespace

void decode_attention(const void* q, const void* k, const void* v, const int64_t* n_keys, void* out,
                      const DecodeAttentionShape& shape, float scale, FloatType dtype) {
  if (dtype == FloatType::kF32) {
    run(static_cast<const float*>(q), static_cast<const float*>(k), static_cast<const float*>(v), n_keys,
        static_cast<float*>(out), shape, scale);
  } else {
    run(static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v), n_keys,
        static_cast<uint16_t*>(out), shape, scale);
  }
}

}  // namespace r1engine
