// Packed varlen attention, CPU kernels. See varlen_attention.h for the contract.
//
// One task per (sequence, KV head). The task converts its keys and values to fp32 once (K^T and V for the
// forward; K, K^T and V^T for the backward, head_dim padded with zeros to a multiple of 8 and the key count to a
// multiple of 8, so every product runs on whole 8-lane vectors), then for each query head of the group:
//   forward:  S = (scale Q) K^T into a scratch block, row softmax in place (lse kept), O = P V, O /= rowsum.
//   backward: S and dP = dO V^T into two scratch blocks, P = exp(S - lse), dS = P (dP - delta) in place, then
//             dV += P^T dO, dK += dS^T (scale Q) and dQ = scale dS K.
// All five products are one register-blocked micro-kernel C[6 x 16] (+)= A B: B rows are loaded as vectors, A
// elements broadcast, so A may be read transposed (P^T, dS^T) through its strides and no dot product needs a
// horizontal sum. Causal masking skips whole tiles above the diagonal; the entries of P and dS just above the
// diagonal that a tile still reads are zeroed. Sequences longer than the score budget are processed in blocks of
// query rows (each block still sees all of its keys, so no online softmax is needed).
#include "core/varlen_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/simd.h"

namespace r1engine {
namespace {

using namespace simd;  // NOLINT(build/namespaces)

constexpr int kMR = 6;                     // rows of a micro-kernel tile (6 x 16: 12 accumulators in 16 registers)
constexpr int64_t kScoreBudget = 1 << 18;  // floats of one score block (1 MiB); longer sequences use row blocks
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up8(int64_t x) { return (x + 7) & ~int64_t{7}; }

// C[MR x NR] = (acc ? C : 0) + sum_kk A(r, kk) B[kk, :], A(r, kk) = A[r * ars + kk * acs].
template <int MR, int NR>
void tile(int64_t K, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb, float* C, int64_t ldc,
          bool acc) {
#ifdef R1_SIMD_AVX2
  // fully unrolled so that GCC keeps the 12 accumulators in registers (a rolled loop spills them every step)
  constexpr int NV = NR / 8;
  __m256 c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int x = 0; x < NV; ++x) c[r][x] = acc ? _mm256_loadu_ps(C + r * ldc + 8 * x) : _mm256_setzero_ps();
  for (int64_t kk = 0; kk < K; ++kk) {
    __m256 b[NV];
#pragma GCC unroll 2
    for (int x = 0; x < NV; ++x) b[x] = _mm256_loadu_ps(B + kk * ldb + 8 * x);
    const float* a = A + kk * acs;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 ar = _mm256_broadcast_ss(a + r * ars);
#pragma GCC unroll 2
      for (int x = 0; x < NV; ++x) c[r][x] = _mm256_fmadd_ps(ar, b[x], c[r][x]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int x = 0; x < NV; ++x) _mm256_storeu_ps(C + r * ldc + 8 * x, c[r][x]);
#else
  float c[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int x = 0; x < NR; ++x) c[r][x] = acc ? C[r * ldc + x] : 0.0f;
  for (int64_t kk = 0; kk < K; ++kk) {
    const float* b = B + kk * ldb;
    for (int r = 0; r < MR; ++r) {
      const float ar = A[r * ars + kk * acs];
      for (int x = 0; x < NR; ++x) c[r][x] += ar * b[x];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int x = 0; x < NR; ++x) C[r * ldc + x] = c[r][x];
#endif
}

template <int NR>
void tile_rows(int mr, int64_t K, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb, float* C,
               int64_t ldc, bool acc) {
  switch (mr) {
    case 1: return tile<1, NR>(K, A, ars, acs, B, ldb, C, ldc, acc);
    case 2: return tile<2, NR>(K, A, ars, acs, B, ldb, C, ldc, acc);
    case 3: return tile<3, NR>(K, A, ars, acs, B, ldb, C, ldc, acc);
    case 4: return tile<4, NR>(K, A, ars, acs, B, ldb, C, ldc, acc);
    case 5: return tile<5, NR>(K, A, ars, acs, B, ldb, C, ldc, acc);
    default: return tile<kMR, NR>(K, A, ars, acs, B, ldb, C, ldc, acc);
  }
}

// What one row tile of a product covers: A's columns / B's rows [k0, k1), C's columns [0, n_end) (n_end % 8 == 0).
struct TileRange {
  int64_t k0, k1, n_end;
};

// C[M x n_end] (+)= A B, tile by tile; `range(r0, mr)` bounds the tile of rows [r0, r0 + mr) (causal masking).
template <class Range>
void gemm(int64_t M, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb, float* C, int64_t ldc,
          bool acc, Range range) {
  for (int64_t r0 = 0; r0 < M; r0 += kMR) {
    const int mr = static_cast<int>(std::min<int64_t>(kMR, M - r0));
    const TileRange t = range(r0, mr);
    const int64_t K = std::max<int64_t>(0, t.k1 - t.k0), k0 = K > 0 ? t.k0 : 0;
    const float* a = A + r0 * ars + k0 * acs;
    const float* b = B + k0 * ldb;
    float* c = C + r0 * ldc;
    int64_t c0 = 0;
    for (; c0 + 16 <= t.n_end; c0 += 16) tile_rows<16>(mr, K, a, ars, acs, b + c0, ldb, c + c0, ldc, acc);
    if (c0 < t.n_end) tile_rows<8>(mr, K, a, ars, acs, b + c0, ldb, c + c0, ldc, acc);
  }
}

// dst[(g * n + i) * dp + j] = scale * src[i * stride + g * d + j] for the `heads` heads of each token row (read
// once, in token order), zero for j in [d, dp).
template <typename T>
void pack_heads(const T* src, int64_t stride, int64_t n, int64_t heads, int64_t d, int64_t dp, float scale,
                float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t g = 0; g < heads; ++g) {
      const T* s = src + i * stride + g * d;
      float* o = dst + (g * n + i) * dp;
      int64_t j = 0;
#ifdef R1_SIMD_AVX2
      const __m256 s8 = _mm256_set1_ps(scale);
      for (; j + 8 <= d; j += 8) _mm256_storeu_ps(o + j, _mm256_mul_ps(load8(s + j), s8));
#endif
      for (; j < d; ++j) o[j] = load_scalar(s, j) * scale;
      for (; j < dp; ++j) o[j] = 0.0f;
    }
  }
}

#ifdef R1_SIMD_AVX2
// In-register transpose of the 8 x 8 block r[0..7] (row k = r[k]).
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20), r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20), r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31), r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31), r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// log(x) for finite x > 0 (here: softmax denominators >= 1): Cephes logf, ~1e-7 relative error.
inline __m256 log256(__m256 x) {
  const __m256i xi = _mm256_castps_si256(x);
  const __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(xi, 23), _mm256_set1_epi32(127));
  __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(xi, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f800000)));
  const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356237f), _CMP_GT_OQ);  // m in [sqrt(1/2), sqrt(2))
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
  const __m256 ef = _mm256_add_ps(_mm256_cvtepi32_ps(e), _mm256_and_ps(big, _mm256_set1_ps(1.0f)));
  const __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.0f)), z = _mm256_mul_ps(f, f);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, f), z);
  y = _mm256_fmadd_ps(ef, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
  return _mm256_fmadd_ps(ef, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y));
}
#endif

// dst[j * ld + i] = src[i * stride + j] for i < n, j < d; zero elsewhere in [dp x ld].
template <typename T>
void pack_transposed(const T* src, int64_t stride, int64_t n, int64_t d, int64_t dp, int64_t ld, float* dst) {
  std::fill(dst, dst + dp * ld, 0.0f);
  int64_t i = 0;
#ifdef R1_SIMD_AVX2
  for (; i + 8 <= n; i += 8) {  // 8 x 8 blocks through registers
    int64_t j = 0;
    for (; j + 8 <= d; j += 8) {
      __m256 r[8];
      for (int x = 0; x < 8; ++x) r[x] = load8(src + (i + x) * stride + j);
      transpose8(r);
      for (int x = 0; x < 8; ++x) _mm256_storeu_ps(dst + (j + x) * ld + i, r[x]);
    }
    for (; j < d; ++j)
      for (int64_t x = i; x < i + 8; ++x) dst[j * ld + x] = load_scalar(src, x * stride + j);
  }
#endif
  for (; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) dst[j * ld + i] = load_scalar(src, i * stride + j);
}

// dst[i * stride + g * d + j] = src[(g * m + i) * dp + j] * scale * (row_scale ? row_scale[g * m + i] : 1) for
// i < m, j < d, g < heads (written in token order).
template <typename T>
void store_heads(const float* src, int64_t m, int64_t heads, int64_t d, int64_t dp, const float* row_scale,
                 float scale, T* dst, int64_t stride) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t g = 0; g < heads; ++g) {
      const float f = row_scale ? row_scale[g * m + i] * scale : scale;
      const float* s = src + (g * m + i) * dp;
      T* o = dst + i * stride + g * d;
      int64_t j = 0;
#ifdef R1_SIMD_AVX2
      const __m256 f8 = _mm256_set1_ps(f);
      for (; j + 8 <= d; j += 8) store8(o + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), f8));
#endif
      for (; j < d; ++j) store_scalar(o, j, s[j] * f);
    }
  }
}

#ifdef R1_SIMD_AVX2
// Lanes [0, rem) set, rem in [0, 8].
inline __m256 lane_mask(int64_t rem) {
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rem)),
                                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}
#endif

// max of s[0, n); the row is readable up to round_up8(n) (the padded score block).
float row_max(const float* s, int64_t n) {
#ifdef R1_SIMD_AVX2
  const __m256 ninf = _mm256_set1_ps(kNegInf);
  __m256 m8 = ninf;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + j));
  if (j < n) m8 = _mm256_max_ps(m8, _mm256_blendv_ps(ninf, _mm256_loadu_ps(s + j), lane_mask(n - j)));
  return hmax(m8);
#else
  float mx = kNegInf;
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
  return mx;
#endif
}

// s = exp(s - m) in place over [0, n), zeros in [n, round_up8(n)); returns the sum.
float exp_sub(float* s, int64_t n, float m) {
#ifdef R1_SIMD_AVX2
  const __m256 m8 = _mm256_set1_ps(m);
  __m256 sum8 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), m8));
    _mm256_storeu_ps(s + j, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  if (j < n) {  // masked tail: lanes past n may hold anything (even NaN); and-ing with the mask zeroes them
    const __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), m8)), lane_mask(n - j));
    _mm256_storeu_ps(s + j, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  return hsum(sum8);
#else
  float sum = 0.0f;
  int64_t j = 0;
  for (; j < n; ++j) sum += (s[j] = std::exp(s[j] - m));
  for (; j < round_up8(n); ++j) s[j] = 0.0f;
  return sum;
#endif
}

// ds = p * (ds - delta) over [0, round_up8(n)): p is zero past n (exp_sub), so is ds there unless ds is not finite,
// so the tail lanes are zeroed explicitly.
void softmax_grad(const float* p, float* ds, int64_t n, float delta) {
  int64_t j = 0;
#ifdef R1_SIMD_AVX2
  const __m256 d8 = _mm256_set1_ps(delta);
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(ds + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), _mm256_sub_ps(_mm256_loadu_ps(ds + j), d8)));
  }
  if (j < n) {
    const __m256 g = _mm256_mul_ps(_mm256_loadu_ps(p + j), _mm256_sub_ps(_mm256_loadu_ps(ds + j), d8));
    _mm256_storeu_ps(ds + j, _mm256_and_ps(g, lane_mask(n - j)));
  }
#else
  for (; j < n; ++j) ds[j] = p[j] * (ds[j] - delta);
  for (; j < round_up8(n); ++j) ds[j] = 0.0f;
#endif
}

template <typename T>
float dot(const T* a, const T* b, int64_t d) {
  float s = 0.0f;
  int64_t j = 0;
#ifdef R1_SIMD_AVX2
  __m256 s8 = _mm256_setzero_ps();
  for (; j + 8 <= d; j += 8) s8 = _mm256_fmadd_ps(load8(a + j), load8(b + j), s8);
  s = hsum(s8);
#endif
  for (; j < d; ++j) s += load_scalar(a, j) * load_scalar(b, j);
  return s;
}

// Row softmax epilogue, r < m: lse[r * stride] = mx[r] + log(sum[r]), inv[r] = 1 / sum[r] (mx, sum readable up
// to round_up8(m)).
void finish_rows(const float* mx, const float* sum, int64_t m, float* inv, float* lse, int64_t stride) {
  int64_t r = 0;
#ifdef R1_SIMD_AVX2
  alignas(32) float l[8], v[8];
  for (; r < m; r += 8) {
    const __m256 s8 = _mm256_loadu_ps(sum + r);
    _mm256_store_ps(l, _mm256_add_ps(_mm256_loadu_ps(mx + r), log256(s8)));
    _mm256_store_ps(v, _mm256_div_ps(_mm256_set1_ps(1.0f), s8));
    for (int64_t x = 0; x < std::min<int64_t>(8, m - r); ++x) lse[(r + x) * stride] = l[x], inv[r + x] = v[x];
  }
#else
  for (; r < m; ++r) {
    lse[r * stride] = mx[r] + std::log(sum[r]);
    inv[r] = 1.0f / sum[r];
  }
#endif
}

// Query rows per score block: the whole sequence when its n x n_pad scores fit the budget.
int64_t block_rows(int64_t n, int64_t np) {
  if (n * np <= kScoreBudget) return n;
  return std::max<int64_t>(kMR, kScoreBudget / np / kMR * kMR);
}

struct Scratch {
  std::vector<float> qs, dos, kt, vt, kp, vp, s, ds, o, dk, dv, rows;

  // Frees the buffers after a task that needed more than `keep` floats in one (a very long sequence), so that the
  // per-thread scratch does not hold that memory for the rest of the process.
  void trim(int64_t keep) {
    for (auto* v : {&qs, &dos, &kt, &vt, &kp, &vp, &s, &ds, &o, &dk, &dv, &rows}) {
      if (static_cast<int64_t>(v->capacity()) > keep) std::vector<float>().swap(*v);
    }
  }
};

constexpr int64_t kKeepScratch = 1 << 22;  // floats (16 MiB) per buffer kept between tasks

inline void grow(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
}

// Strides of one task's views: token rows of q/out/dq (hq * d) and of k/v/dk/dv (hkv * d), lse rows (hq).
struct TaskView {
  int64_t n, group, d, q_stride, kv_stride, lse_stride;
};

template <typename T>
void fwd_task(const T* q, const T* k, const T* v, T* out, float* lse, const TaskView& t, float scale, bool causal,
              Scratch& w) {
  const int64_t n = t.n, G = t.group, d = t.d, dp = round_up8(d), np = round_up8(n), qb = block_rows(n, np);
  grow(w.kt, dp * np), grow(w.vp, n * dp), grow(w.qs, G * n * dp), grow(w.s, qb * np), grow(w.o, G * qb * dp);
  grow(w.rows, G * qb + 2 * round_up8(qb));
  float *kt = w.kt.data(), *vp = w.vp.data(), *qs = w.qs.data(), *s = w.s.data(), *o = w.o.data();
  float *inv = w.rows.data(), *mxs = inv + G * qb, *sums = mxs + round_up8(qb);
  pack_transposed(k, t.kv_stride, n, d, dp, np, kt);
  pack_heads(v, t.kv_stride, n, 1, d, dp, 1.0f, vp);
  pack_heads(q, t.q_stride, n, G, d, dp, scale, qs);
  for (int64_t i0 = 0; i0 < n; i0 += qb) {
    const int64_t m = std::min(qb, n - i0);
    for (int64_t g = 0; g < G; ++g) {
      gemm(m, qs + (g * n + i0) * dp, dp, 1, kt, np, s, np, false, [&](int64_t r0, int mr) {
        return TileRange{0, dp, causal ? std::min(np, round_up8(i0 + r0 + mr)) : np};
      });
      for (int64_t r = 0; r < m; ++r) {
        const int64_t i = i0 + r, len = causal ? i + 1 : n;
        float* sr = s + r * np;
        mxs[r] = row_max(sr, len);
        sums[r] = exp_sub(sr, len, mxs[r]);
        for (int64_t j = round_up8(len); j < std::min(n, i + kMR); ++j) sr[j] = 0.0f;  // read by the diagonal tile
      }
      finish_rows(mxs, sums, m, inv + g * m, lse + i0 * t.lse_stride + g, t.lse_stride);
      gemm(m, s, np, 1, vp, dp, o + g * m * dp, dp, false, [&](int64_t r0, int mr) {
        return TileRange{0, causal ? std::min(n, i0 + r0 + mr) : n, dp};
      });
    }
    store_heads(o, m, G, d, dp, inv, 1.0f, out + i0 * t.q_stride, t.q_stride);
  }
}

template <typename T>
void bwd_task(const T* dout, const T* q, const T* k, const T* v, const T* out, const float* lse, T* dq, T* dk, T* dv,
              const TaskView& t, float scale, bool causal, Scratch& w) {
  const int64_t n = t.n, G = t.group, d = t.d, dp = round_up8(d), np = round_up8(n), qb = block_rows(n, np);
  grow(w.kt, dp * np), grow(w.vt, dp * np), grow(w.kp, n * dp), grow(w.qs, G * n * dp), grow(w.dos, G * n * dp);
  grow(w.s, qb * np), grow(w.ds, qb * np), grow(w.o, G * qb * dp), grow(w.rows, G * n);
  grow(w.dk, n * dp), grow(w.dv, n * dp);
  float *kt = w.kt.data(), *vt = w.vt.data(), *kp = w.kp.data(), *qs = w.qs.data(), *dos = w.dos.data();
  float *p = w.s.data(), *ds = w.ds.data(), *dqb = w.o.data(), *dka = w.dk.data(), *dva = w.dv.data();
  float* delta = w.rows.data();
  std::fill(dka, dka + n * dp, 0.0f);
  std::fill(dva, dva + n * dp, 0.0f);
  pack_transposed(k, t.kv_stride, n, d, dp, np, kt);
  pack_transposed(v, t.kv_stride, n, d, dp, np, vt);
  pack_heads(k, t.kv_stride, n, 1, d, dp, 1.0f, kp);
  pack_heads(q, t.q_stride, n, G, d, dp, scale, qs);
  pack_heads(dout, t.q_stride, n, G, d, dp, 1.0f, dos);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t g = 0; g < G; ++g) delta[g * n + i] = dot(dout + i * t.q_stride + g * d, out + i * t.q_stride + g * d, d);
  for (int64_t i0 = 0; i0 < n; i0 += qb) {
    const int64_t m = std::min(qb, n - i0);
    const auto score_range = [&](int64_t r0, int mr) {
      return TileRange{0, dp, causal ? std::min(np, round_up8(i0 + r0 + mr)) : np};
    };
    // dV[j] += sum_i P[i, j] dO[i] and dK[j] += sum_i dS[i, j] (scale Q)[i]: A = P^T, dS^T through the strides;
    // causal: only keys j < i0 + m are seen by this block, and key j only by rows i >= j.
    const int64_t keys = causal ? i0 + m : n;
    const auto key_range = [&](int64_t r0, int) {
      return TileRange{causal ? std::max<int64_t>(0, r0 - i0) : 0, m, dp};
    };
    for (int64_t g = 0; g < G; ++g) {
      const float *qg = qs + (g * n + i0) * dp, *dog = dos + (g * n + i0) * dp;
      gemm(m, qg, dp, 1, kt, np, p, np, false, score_range);
      gemm(m, dog, dp, 1, vt, np, ds, np, false, score_range);
      for (int64_t r = 0; r < m; ++r) {
        const int64_t i = i0 + r, len = causal ? i + 1 : n;
        float *pr = p + r * np, *dsr = ds + r * np;
        exp_sub(pr, len, lse[i * t.lse_stride + g]);
        softmax_grad(pr, dsr, len, delta[g * n + i]);
        for (int64_t j = round_up8(len); j < std::min(n, i + kMR); ++j) pr[j] = dsr[j] = 0.0f;  // diagonal tiles
      }
      gemm(keys, p, 1, np, dog, dp, dva, dp, true, key_range);
      gemm(keys, ds, 1, np, qg, dp, dka, dp, true, key_range);
      gemm(m, ds, np, 1, kp, dp, dqb + g * m * dp, dp, false, [&](int64_t r0, int mr) {
        return TileRange{0, causal ? std::min(n, i0 + r0 + mr) : n, dp};
      });
    }
    store_heads(dqb, m, G, d, dp, nullptr, scale, dq + i0 * t.q_stride, t.q_stride);
  }
  store_heads(dka, n, 1, d, dp, nullptr, 1.0f, dk, t.kv_stride);
  store_heads(dva, n, 1, d, dp, nullptr, 1.0f, dv, t.kv_stride);
}

// Runs fn(task view, token offset a, KV head h, scratch) over the (sequence, KV head) tasks.
template <class Fn>
void for_each_task(const int32_t* cu, const VarlenAttentionShape& s, Fn fn) {
  const int64_t tasks = s.num_seqs * s.kv_heads;
  const int64_t group = s.q_heads / s.kv_heads;
  // work ~ sum of n^2 per task; total * head_dim * heads is a cheap lower bound to decide on threads
#pragma omp parallel if (tasks > 1 && s.total * s.q_heads * s.head_dim >= (1 << 16))
  {
    // per thread, kept across calls: no allocation or page faults per call (buffers over kKeepScratch are freed)
    thread_local Scratch w;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / s.kv_heads, h = task % s.kv_heads;
      const int64_t a = cu[b], n = static_cast<int64_t>(cu[b + 1]) - a;
      if (n <= 0) continue;
      const TaskView t{n, group, s.head_dim, s.q_heads * s.head_dim, s.kv_heads * s.head_dim, s.q_heads};
      fn(t, a, h, w);
      w.trim(kKeepScratch);
    }
  }
}

template <typename T>
void run_fwd(const T* q, const T* k, const T* v, const int32_t* cu, T* out, float* lse, const VarlenAttentionShape& s,
             float scale, bool causal) {
  const int64_t group = s.q_heads / s.kv_heads, d = s.head_dim;
  for_each_task(cu, s, [&](const TaskView& t, int64_t a, int64_t h, Scratch& w) {
    const int64_t qo = (a * s.q_heads + h * group) * d, ko = (a * s.kv_heads + h) * d;
    fwd_task(q + qo, k + ko, v + ko, out + qo, lse + a * s.q_heads + h * group, t, scale, causal, w);
  });
}

template <typename T>
void run_bwd(const T* dout, const T* q, const T* k, const T* v, const T* out, const float* lse, const int32_t* cu,
             T* dq, T* dk, T* dv, const VarlenAttentionShape& s, float scale, bool causal) {
  const int64_t group = s.q_heads / s.kv_heads, d = s.head_dim;
  for_each_task(cu, s, [&](const TaskView& t, int64_t a, int64_t h, Scratch& w) {
    const int64_t qo = (a * s.q_heads + h * group) * d, ko = (a * s.kv_heads + h) * d;
    bwd_task(dout + qo, q + qo, k + ko, v + ko, out + qo, lse + a * s.q_heads + h * group, dq + qo, dk + ko,
             dv + ko, t, scale, causal, w);
  });
}

}  // namespace

void varlen_attention_fwd(const void* q, const void* k, const void* v, const int32_t* cu_seqlens, void* out,
                          float* lse, const VarlenAttentionShape& shape, float scale, bool causal, FloatType dtype) {
  if (dtype == FloatType::kF32) {
    run_fwd(static_cast<const float*>(q), static_cast<const float*>(k), static_cast<const float*>(v), cu_seqlens,
            static_cast<float*>(out), lse, shape, scale, causal);
  } else {
    run_fwd(static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v),
            cu_seqlens, static_cast<uint16_t*>(out), lse, shape, scale, causal);
  }
}

void varlen_attention_bwd(const void* dout, const void* q, const void* k, const void* v, const void* out,
                          const float* lse, const int32_t* cu_seqlens, void* dq, void* dk, void* dv,
                          const VarlenAttentionShape& shape, float scale, bool causal, FloatType dtype) {
  if (dtype == FloatType::kF32) {
    run_bwd(static_cast<const float*>(dout), static_cast<const float*>(q), static_cast<const float*>(k),
            static_cast<const float*>(v), static_cast<const float*>(out), lse, cu_seqlens, static_cast<float*>(dq),
            static_cast<float*>(dk), static_cast<float*>(dv), shape, scale, causal);
  } else {
    run_bwd(static_cast<const uint16_t*>(dout), static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k),
            static_cast<const uint16_t*>(v), static_cast<const uint16_t*>(out), lse, cu_seqlens,
            static_cast<uint16_t*>(dq), static_cast<uint16_t*>(dk), static_cast<uint16_t*>(dv), shape, scale, causal);
  }
}

}  // namespace r1engine
