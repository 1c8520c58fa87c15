// Vocabulary passes of the GRPO-family losses, CPU kernel. See grpo_loss.h for the contract.
//
// Forward: each row is streamed once from memory in chunks of kChunk elements that stay in L1: a max pass over
// the chunk (also detecting NaN), one rescale of the running sum if the max grew, then an exp-sum pass over the
// (now cached) chunk. This is the online log-sum-exp with one rescale per chunk instead of one per element, so
// the row costs one exp per logit and one read from DRAM.
// Backward: one read + one write per logit (non-temporal stores when writing to a separate buffer, so the
// destination is not read for ownership); rows with dlogp == 0 are zero-filled without reading the logits.
#include "core/grpo_loss.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/simd.h"

namespace r1engine {
namespace {

using namespace simd;  // NOLINT(build/namespaces): the kernels below are written in its vocabulary

constexpr int64_t kChunk = 2048;  // elements per online-LSE chunk (8 KiB of fp32: stays in L1)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();


// Max of x[0:len] and whether any element is NaN.
template <class T>
inline float chunk_max(const T* x, int64_t len, bool* has_nan) {
  int64_t j = 0;
  float m = kNegInf;
  bool nan = false;
#ifdef R1_SIMD_AVX2
  __m256 m0 = _mm256_set1_ps(kNegInf), m1 = m0;
  __m256 n0 = _mm256_setzero_ps();
  for (; j + 16 <= len; j += 16) {
    const __m256 a = load8(x + j), b = load8(x + j + 8);
    m0 = _mm256_max_ps(m0, a);
    m1 = _mm256_max_ps(m1, b);
    n0 = _mm256_or_ps(n0, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
  }
  m = hmax(_mm256_max_ps(m0, m1));
  nan = _mm256_movemask_ps(n0) != 0;
#endif
  for (; j < len; ++j) {
    const float a = load_scalar(x, j);
    nan |= std::isnan(a);
    m = std::max(m, a);
  }
  *has_nan = nan;
  return m;
}

// sum_j exp((x[j] - m) * inv_t) over x[0:len]. While this compute-heavy pass runs on the cached chunk, the next
// chunk (`next`, `next_len` elements) is prefetched so that memory and compute overlap.
template <class T>
inline float chunk_expsum(const T* x, int64_t len, float m, float inv_t, const T* next, int64_t next_len) {
  int64_t j = 0;
  float s = 0.0f;
#ifdef R1_SIMD_AVX2
  const __m256 vi = _mm256_set1_ps(inv_t);
  const __m256 vb = _mm256_set1_ps(m * inv_t);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  for (; j + 16 <= len; j += 16) {
    if (j < next_len) _mm_prefetch(reinterpret_cast<const char*>(next + j), _MM_HINT_T0);
    s0 = _mm256_add_ps(s0, exp256(_mm256_fmsub_ps(load8(x + j), vi, vb)));
    s1 = _mm256_add_ps(s1, exp256(_mm256_fmsub_ps(load8(x + j + 8), vi, vb)));
  }
  s = hsum(_mm256_add_ps(s0, s1));
#else
  (void)next;
  (void)next_len;
#endif
  for (; j < len; ++j) s += std::exp((load_scalar(x, j) - m) * inv_t);
  return s;
}

// Like chunk_expsum, plus sum_j exp((x[j] - m) * inv_t) * (x[j] - m) * inv_t (for the entropy) in the same pass. The
// shifted logit keeps the sum small (no cancellation of two large numbers when the logits are large). The sum of
// exponentials is accumulated exactly as chunk_expsum does it, so the log-sum-exp (hence the log-probabilities and
// the loss) is bit-identical whether or not the entropy is asked for.
template <class T>
inline void chunk_expsum_ez(const T* x, int64_t len, float m, float inv_t, double* s_out, double* t_out) {
  int64_t j = 0;
  float s = 0.0f, t = 0.0f;
#ifdef R1_SIMD_AVX2
  const __m256 vi = _mm256_set1_ps(inv_t);
  const __m256 vb = _mm256_set1_ps(m * inv_t);
  const __m256 lowest = _mm256_set1_ps(std::numeric_limits<float>::lowest());
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, t0 = s0, t1 = s0;
  for (; j + 16 <= len; j += 16) {
    const __m256 d0 = _mm256_fmsub_ps(load8(x + j), vi, vb);
    const __m256 d1 = _mm256_fmsub_ps(load8(x + j + 8), vi, vb);
    const __m256 e0 = exp256(d0), e1 = exp256(d1);
    s0 = _mm256_add_ps(s0, e0);
    s1 = _mm256_add_ps(s1, e1);
    t0 = _mm256_fmadd_ps(e0, _mm256_max_ps(d0, lowest), t0);  // a -inf logit: 0 * lowest = 0, not 0 * -inf = NaN
    t1 = _mm256_fmadd_ps(e1, _mm256_max_ps(d1, lowest), t1);
  }
  s = hsum(_mm256_add_ps(s0, s1));
  t = hsum(_mm256_add_ps(t0, t1));
#endif
  for (; j < len; ++j) {
    const float d = (load_scalar(x, j) - m) * inv_t;
    const float e = std::exp(d);
    s += e;
    if (e != 0.0f) t += e * d;  // a -inf logit (p = 0) adds 0, not 0 * -inf = NaN
  }
  *s_out += s;
  *t_out += t;
}

// log-sum-exp of x[0:v] / T and the entropy of softmax(x / T), with one streaming pass (online max m; the running
// sums s = sum exp(z - m') and t = sum exp(z - m') (z - m'), m' = m / T, are rescaled together when the max grows).
// H = lse - E_p[z] = log s - t / s.
template <class T>
float row_lse_entropy(const T* x, int64_t v, float inv_t, float* entropy) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  float m = kNegInf;
  double s = 0.0, t = 0.0;
  for (int64_t c = 0; c < v; c += kChunk) {
    const int64_t len = std::min(kChunk, v - c);
    bool has_nan = false;
    const float cm = chunk_max(x + c, len, &has_nan);
    if (has_nan || cm == std::numeric_limits<float>::infinity()) {
      *entropy = nan;
      return nan;
    }
    if (cm > m) {
      if (m != kNegInf) {  // shift the sums from the old max to the new one: z - m_old = (z - m_new) + (m_new - m_old)
        const double shift = static_cast<double>((m - cm) * inv_t);
        const double f = std::exp(shift);
        t = f * (t + s * shift);
        s *= f;
      }
      m = cm;
    }
    if (m == kNegInf) continue;
    chunk_expsum_ez(x + c, len, m, inv_t, &s, &t);
  }
  if (m == kNegInf) {
    *entropy = nan;
    return nan;
  }
  const double log_s = std::log(s);
  *entropy = static_cast<float>(log_s - t / s);
  return m * inv_t + static_cast<float>(log_s);
}

// log-sum-exp of x[0:v] / T with one streaming pass (online max + rescaled sum, one rescale per chunk).
template <class T>
float row_lse(const T* x, int64_t v, float inv_t) {
  float m = kNegInf;
  double s = 0.0;
  for (int64_t c = 0; c < v; c += kChunk) {
    const int64_t len = std::min(kChunk, v - c);
    bool nan = false;
    const float cm = chunk_max(x + c, len, &nan);
    if (nan) return std::numeric_limits<float>::quiet_NaN();
    if (cm > m) {
      if (m != kNegInf) s *= std::exp(static_cast<double>((m - cm) * inv_t));
      m = cm;
    }
    if (m == kNegInf) continue;                                   // everything so far is -inf: adds 0
    if (m == std::numeric_limits<float>::infinity()) return std::numeric_limits<float>::quiet_NaN();
    const int64_t next_len = std::min(kChunk, std::max<int64_t>(v - c - kChunk, 0));
    s += chunk_expsum(x + c, len, m, inv_t, x + c + kChunk, next_len);
  }
  if (m == kNegInf) return std::numeric_limits<float>::quiet_NaN();  // all -inf: undefined
  return m * inv_t + static_cast<float>(std::log(s));
}

template <class T>
void row_bwd(const T* x, int64_t v, int64_t target, float lse, float g, float inv_t, T* out, bool stream) {
  // g already includes 1/T. Read the target logit first: out may alias x.
  const float p_t = std::exp(load_scalar(x, target) * inv_t - lse);
  int64_t j = 0;
  (void)stream;
#ifdef R1_SIMD_AVX2
  const __m256 vi = _mm256_set1_ps(inv_t);
  const __m256 vl = _mm256_set1_ps(lse);
  const __m256 vg = _mm256_set1_ps(-g);
  // Streaming stores need an aligned destination (32 B for 8 fp32, 16 B for 8 bf16): scalar code up to it.
  if (stream) {
    constexpr uintptr_t align = sizeof(T) == 4 ? 32u : 16u;
    for (; j < v && (reinterpret_cast<uintptr_t>(out + j) & (align - 1)) != 0; ++j)
      store_scalar(out, j, -std::exp(load_scalar(x, j) * inv_t - lse) * g);
  }
  for (; j + 8 <= v; j += 8) {
    const __m256 p = exp256(_mm256_fmsub_ps(load8(x + j), vi, vl));
    store8(out + j, _mm256_mul_ps(p, vg), stream);
  }
#endif
  for (; j < v; ++j) store_scalar(out, j, -std::exp(load_scalar(x, j) * inv_t - lse) * g);
  store_scalar(out, target, (1.0f - p_t) * g);
}

// The backward of a row with an entropy term: out[j] = -p_j * (g + e * (z_j - c)) with z = x / T, p = exp(z - lse),
// c = lse - H, and g, e already including 1/T; the target also gets + g.
template <class T>
void row_bwd_entropy(const T* x, int64_t v, int64_t target, float lse, float g, float e, float c, float inv_t,
                     T* out) {
  const float z_t = load_scalar(x, target) * inv_t;  // read first: out may alias x
  const float p_t = std::exp(z_t - lse);
  int64_t j = 0;
#ifdef R1_SIMD_AVX2
  const __m256 vi = _mm256_set1_ps(inv_t);
  const __m256 vl = _mm256_set1_ps(lse);
  const __m256 vg = _mm256_set1_ps(g);
  const __m256 ve = _mm256_set1_ps(e);
  const __m256 vc = _mm256_set1_ps(c);
  const __m256 neg = _mm256_set1_ps(-1.0f);
  const __m256 zero = _mm256_setzero_ps();
  for (; j + 8 <= v; j += 8) {
    __m256 z = _mm256_mul_ps(load8(x + j), vi);
    const __m256 p = exp256(_mm256_sub_ps(z, vl));
    z = _mm256_blendv_ps(z, vc, _mm256_cmp_ps(p, zero, _CMP_EQ_OQ));  // p = 0 (a -inf logit): term 0, not 0 * inf
    const __m256 coef = _mm256_fmadd_ps(ve, _mm256_sub_ps(z, vc), vg);
    store8(out + j, _mm256_mul_ps(_mm256_mul_ps(p, coef), neg), false);
  }
#endif
  for (; j < v; ++j) {
    const float z = load_scalar(x, j) * inv_t;
    const float p = std::exp(z - lse);
    store_scalar(out, j, p == 0.0f ? -0.0f : -p * (g + e * (z - c)));  // p = 0: 0, not 0 * inf = NaN
  }
  store_scalar(out, target, p_t == 0.0f ? g : g - p_t * (g + e * (z_t - c)));
}

template <class T>
void zero_row(T* out, int64_t v) {
  std::memset(static_cast<void*>(out), 0, static_cast<size_t>(v) * sizeof(T));
}

template <class T>
void token_logprobs_impl(const T* logits, int64_t n, int64_t v, int64_t rs, const int64_t* targets, const float* live,
                         float temp, float* logp, float* lse, float* entropy) {
  const float inv_t = 1.0f / temp;
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t i = 0; i < n; ++i) {
    if (live != nullptr && live[i] == 0.0f) {
      logp[i] = lse[i] = 0.0f;
      if (entropy != nullptr) entropy[i] = 0.0f;
      continue;
    }
    const T* x = logits + i * rs;
    const float l = entropy != nullptr ? row_lse_entropy(x, v, inv_t, entropy + i) : row_lse(x, v, inv_t);
    lse[i] = l;
    logp[i] = load_scalar(x, targets[i]) * inv_t - l;
  }
}

template <class T>
void logprobs_bwd_impl(const T* logits, int64_t n, int64_t v, int64_t rs, const int64_t* targets, const float* lse,
                       const float* dlogp, const float* dent, const float* ent, float temp, T* grad, int64_t grs) {
  const float inv_t = 1.0f / temp;
  const bool stream = static_cast<const void*>(grad) != static_cast<const void*>(logits);
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t i = 0; i < n; ++i) {
    T* out = grad + i * grs;
    const float de = dent != nullptr ? dent[i] : 0.0f;
    if (dlogp[i] == 0.0f && de == 0.0f) {
      zero_row(out, v);
      continue;
    }
    if (de != 0.0f) {
      row_bwd_entropy(logits + i * rs, v, targets[i], lse[i], dlogp[i] * inv_t, de * inv_t, lse[i] - ent[i], inv_t,
                      out);
      continue;
    }
    row_bwd(logits + i * rs, v, targets[i], lse[i], dlogp[i] * inv_t, inv_t, out, stream);
#ifdef R1_SIMD_AVX2
    if (stream) _mm_sfence();  // order this thread's non-temporal stores before the region ends
#endif
  }
}

}  // namespace

int64_t first_invalid_target(const int64_t* targets, int64_t n, int64_t v) {
  for (int64_t i = 0; i < n; ++i)
    if (targets[i] < 0 || targets[i] >= v) return i;
  return -1;
}

int64_t first_nonfinite(const float* lse, const float* weights, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if ((weights == nullptr || weights[i] != 0.0f) && !std::isfinite(lse[i])) return i;
  return -1;
}

void token_logprobs_fwd(const void* logits, FloatType dtype, int64_t n, int64_t v, int64_t row_stride,
                        const int64_t* targets, const float* live, float temperature, float* logp, float* lse,
                        float* entropy) {
  if (dtype == FloatType::kF32)
    token_logprobs_impl(static_cast<const float*>(logits), n, v, row_stride, targets, live, temperature, logp, lse,
                        entropy);
  else
    token_logprobs_impl(static_cast<const uint16_t*>(logits), n, v, row_stride, targets, live, temperature, logp,
                        lse, entropy);
}

void logprobs_bwd(const void* logits, FloatType dtype, int64_t n, int64_t v, int64_t row_stride,
                  const int64_t* targets, const float* lse, const float* dlogp, const float* dentropy,
                  const float* entropy, float temperature, void* grad, int64_t grad_row_stride) {
  if (dtype == FloatType::kF32)
    logprobs_bwd_impl(static_cast<const float*>(logits), n, v, row_stride, targets, lse, dlogp, dentropy, entropy,
                      temperature, static_cast<float*>(grad), grad_row_stride);
  else
    logprobs_bwd_impl(static_cast<const uint16_t*>(logits), n, v, row_stride, targets, lse, dlogp, dentropy,
                      entropy, temperature, static_cast<uint16_t*>(grad), grad_row_stride);
}

}  // namespace r1engine
