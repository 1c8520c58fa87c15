// Decode-step attention, CPU kernel. See decode_attention.h for the contract.
//
// One task per (row, KV head) handles the query heads that share that KV head. AVX2 path (head_dim % 8 == 0):
// the keys go in chunks (one chunk at decode lengths; longer caches merge chunks with an online-softmax rescale).
// Per chunk: scores in blocks of 8 keys, each key row multiplied lane-wise with the query held in registers and the
// 8 partial vectors reduced together (one transpose-reduce per 8 keys); max, exp and sum over the scores in an L1
// buffer; then P.V with the fp32 accumulators of up to 3 heads x 4 vectors in registers while the values stream
// past once. Head dims 32, 64 and 128 compile with fixed loop bounds (short runtime-bound loops and accumulators
// in memory were most of the time before), other multiples of 8 take the same code with a runtime bound, and other
// sizes (or a build without AVX2) the scalar path. All scratch is allocated once per call and thread.
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
  std::vector<float> q, scores, acc;  // [group, d], [group, chunk or n], [group, d]
};

// Scalar path (head_dim % 8 != 0 or no AVX2): scores for all n keys, then softmax, then P.V.

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
void attend_scalar(const T* q, const T* k, const T* v, T* out, int64_t group, int64_t n, int64_t d, float scale,
                   Scratch& w) {
  w.scores.resize(static_cast<size_t>(group * n));
  w.acc.assign(static_cast<size_t>(group * d), 0.0f);
  for (int64_t i = 0; i < group * d; ++i) w.q[i] = load_scalar(q, i) * scale;
  scores_scalar(w.q.data(), k, group, n, d, w.scores.data());
  float inv[64];  // group <= 64 is checked by the caller
  for (int64_t g = 0; g < group; ++g) inv[g] = 1.0f / softmax_numerators(w.scores.data() + g * n, n);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t g = 0; g < group; ++g) {
      const float p = w.scores[g * n + j];
      for (int64_t i = 0; i < d; ++i) w.acc[g * d + i] += p * load_scalar(v, j * d + i);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t i = 0; i < d; ++i) store_scalar(out, g * d + i, w.acc[g * d + i] * inv[g]);
  }
}

#ifdef R1_SIMD_AVX2
// Keys per chunk: the scores of a chunk (group x chunk floats) stay within 16 KB of L1.
int64_t chunk_len(int64_t group) { return std::clamp<int64_t>(4096 / group, 64, 512) / 8 * 8; }

// NV = head_dim / 8, fixed at compile time (4, 8 or 16) or 0 for the runtime value nv.

// sc[g * ld + j] = q_g . k_j for j < n; the rest of the last block of 8 is set to -inf (exp gives 0).
// mx[g] = the largest score of head g.
template <int NV, typename T>
void scores_avx2(const float* q, const T* k, int64_t group, int64_t nv_rt, int64_t n, float* sc, int64_t ld,
                 float* mx) {
  const int64_t nv = NV > 0 ? NV : nv_rt, d = nv * 8;
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = q + g * d;
    float* s = sc + g * ld;
    auto dot = [&](const T* kj) {
      __m256 a = _mm256_mul_ps(_mm256_loadu_ps(qg), load8(kj));
      for (int64_t i = 1; i < nv; ++i) a = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * i), load8(kj + 8 * i), a);
      return a;
    };
    __m256 mx8 = _mm256_set1_ps(kNegInf);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      __m256 rows[8];
      for (int jj = 0; jj < 8; ++jj) rows[jj] = dot(k + (j + jj) * d);
      const __m256 sj = hsum8x8(rows);
      _mm256_storeu_ps(s + j, sj);
      mx8 = _mm256_max_ps(mx8, sj);
    }
    if (j < n) {  // last partial block: zero rows for the missing keys, -inf in their lanes
      __m256 rows[8];
      for (int jj = 0; jj < 8; ++jj) rows[jj] = j + jj < n ? dot(k + (j + jj) * d) : _mm256_setzero_ps();
      const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256 valid = _mm256_cmp_ps(lane, _mm256_set1_ps(static_cast<float>(n - j)), _CMP_LT_OQ);
      const __m256 sj = _mm256_blendv_ps(_mm256_set1_ps(kNegInf), hsum8x8(rows), valid);
      _mm256_storeu_ps(s + j, sj);
      mx8 = _mm256_max_ps(mx8, sj);
    }
    mx[g] = hmax(mx8);
  }
}

// acc[g, tile] (+)= sum_j p[g * ld + j] * v_j[tile] for GB heads and a tile of TV vectors of the head dim, the
// accumulators in registers. first: start from zero, else from acc scaled by corr[g] (online-softmax rescale).
template <int TV, int GB, typename T>
void pv_tile(const float* p, int64_t ld, const T* v, int64_t d, int64_t n, float* acc, const float* corr,
             bool first) {
  __m256 a[GB][TV];
  for (int g = 0; g < GB; ++g) {
    const __m256 c = _mm256_set1_ps(first ? 0.0f : corr[g]);
    for (int i = 0; i < TV; ++i) {
      a[g][i] = first ? _mm256_setzero_ps() : _mm256_mul_ps(c, _mm256_loadu_ps(acc + g * d + 8 * i));
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    const T* vj = v + j * d;
    for (int g = 0; g < GB; ++g) {
      const __m256 pj = _mm256_broadcast_ss(p + g * ld + j);
      for (int i = 0; i < TV; ++i) a[g][i] = _mm256_fmadd_ps(pj, load8(vj + 8 * i), a[g][i]);
    }
  }
  for (int g = 0; g < GB; ++g) {
    for (int i = 0; i < TV; ++i) _mm256_storeu_ps(acc + g * d + 8 * i, a[g][i]);
  }
}

// All heads in blocks of GB, the remainder with smaller blocks.
template <int TV, int GB, typename T>
void pv_heads(const float* p, int64_t ld, const T* v, int64_t d, int64_t n, float* acc, const float* corr,
              bool first, int64_t group) {
  int64_t g = 0;
  for (; g + GB <= group; g += GB) pv_tile<TV, GB>(p + g * ld, ld, v, d, n, acc + g * d, corr + g, first);
  if constexpr (GB > 1) {
    if (g < group) pv_heads<TV, GB - 1>(p + g * ld, ld, v, d, n, acc + g * d, corr + g, first, group - g);
  }
}

template <int NV, typename T>
void pv_avx2(const float* p, int64_t ld, const T* v, int64_t nv_rt, int64_t n, float* acc, const float* corr,
             bool first, int64_t group) {
  const int64_t nv = NV > 0 ? NV : nv_rt, d = nv * 8;
  int64_t t = 0;
  // 3 heads x 4 vectors = 12 accumulators (+ a broadcast, values as memory operands) fit the 16 registers
  if constexpr (NV == 0 || NV % 8 != 0) {
    for (; t + 4 <= nv; t += 4) pv_heads<4, 3>(p, ld, v + 8 * t, d, n, acc + 8 * t, corr, first, group);
  }
  for (; t + 8 <= nv; t += 8) pv_heads<8, 1>(p, ld, v + 8 * t, d, n, acc + 8 * t, corr, first, group);
  for (; t + 2 <= nv; t += 2) pv_heads<2, 4>(p, ld, v + 8 * t, d, n, acc + 8 * t, corr, first, group);
  for (; t < nv; ++t) pv_heads<1, 4>(p, ld, v + 8 * t, d, n, acc + 8 * t, corr, first, group);
}

template <int NV, typename T>
void attend_avx2(const T* q, const T* k, const T* v, T* out, int64_t group, int64_t n, int64_t d, float scale,
                 int64_t chunk, Scratch& w) {
  const int64_t nv = d / 8;
  float* qs = w.q.data();
  float* sc = w.scores.data();
  float* acc = w.acc.data();
  for (int64_t i = 0; i < group * d; ++i) qs[i] = load_scalar(q, i) * scale;
  // running max, softmax denominator, rescale of the previous chunks; the chunk's max
  float mx[64], den[64], corr[64], cmx[64];
  for (int64_t c0 = 0; c0 < n; c0 += chunk) {
    const int64_t m = std::min(chunk, n - c0), mb = (m + 7) / 8 * 8;
    const bool first = c0 == 0;
    scores_avx2<NV>(qs, k + c0 * d, group, nv, m, sc, chunk, cmx);
    for (int64_t g = 0; g < group; ++g) {
      float* s = sc + g * chunk;
      const float cmax = first ? cmx[g] : std::max(mx[g], cmx[g]);
      const __m256 m8 = _mm256_set1_ps(cmax);
      __m256 sum8 = _mm256_setzero_ps();
      for (int64_t j = 0; j < mb; j += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), m8));
        _mm256_storeu_ps(s + j, e);
        sum8 = _mm256_add_ps(sum8, e);
      }
      if (first) {
        den[g] = hsum(sum8);
      } else {
        corr[g] = std::exp(mx[g] - cmax);
        den[g] = den[g] * corr[g] + hsum(sum8);
      }
      mx[g] = cmax;
    }
    pv_avx2<NV>(sc, chunk, v + c0 * d, nv, m, acc, corr, first, group);
  }
  for (int64_t g = 0; g < group; ++g) {
    const __m256 inv = _mm256_set1_ps(1.0f / den[g]);
    for (int64_t i = 0; i < d; i += 8) store8(out + g * d + i, _mm256_mul_ps(_mm256_loadu_ps(acc + g * d + i), inv));
  }
}
#endif

template <typename T>
void run(const T* q, const T* k, const T* v, const int64_t* n_keys, T* out, const DecodeAttentionShape& s,
         float scale) {
  const int64_t group = s.q_heads / s.kv_heads, d = s.head_dim;
  const int64_t tasks = s.batch * s.kv_heads;
#ifdef R1_SIMD_AVX2
  const bool vec = d % 8 == 0;
  const int64_t chunk = chunk_len(group);
#else
  const bool vec = false;
#endif
#pragma omp parallel if (tasks * group * s.cache_len * d >= (1 << 16))
  {
    Scratch w;
    w.q.resize(static_cast<size_t>(group * d));
    w.acc.resize(static_cast<size_t>(group * d));
#ifdef R1_SIMD_AVX2
    if (vec) w.scores.resize(static_cast<size_t>(group * chunk));
#endif
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
      const T *qt = q + q_off, *kt = k + kv_off, *vt = v + kv_off;
      T* ot = out + q_off;
      if (!vec) {
        attend_scalar(qt, kt, vt, ot, group, n, d, scale, w);
        continue;
      }
#ifdef R1_SIMD_AVX2
      switch (d) {
        case 32: attend_avx2<4>(qt, kt, vt, ot, group, n, d, scale, chunk, w); break;
        case 64: attend_avx2<8>(qt, kt, vt, ot, group, n, d, scale, chunk, w); break;
        case 128: attend_avx2<16>(qt, kt, vt, ot, group, n, d, scale, chunk, w); break;
        default: attend_avx2<0>(qt, kt, vt, ot, group, n, d, scale, chunk, w); break;
      }
#endif
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
