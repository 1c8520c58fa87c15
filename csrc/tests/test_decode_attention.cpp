// Unit tests of the decode-step attention (csrc/core/decode_attention.*) against a double-precision softmax
// attention: grouped-query heads (1 to 64 query heads per KV head), ragged key counts including 0, 1, around the
// blocks of 8 keys, the full cache and more than one chunk of keys, head dims of the fixed-size (32, 64, 128),
// runtime-size (multiples of 8) and scalar (odd) paths, fp32 and bf16.
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "core/decode_attention.h"
#include "tests/check.h"

using r1engine::DecodeAttentionShape;
using r1engine::FloatType;

namespace {

// out[b, h, :] = softmax(scale * q . k_j, j < n_b) @ v, in double
std::vector<double> reference(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                              const std::vector<int64_t>& n_keys, const DecodeAttentionShape& s, double scale) {
  const int64_t group = s.q_heads / s.kv_heads, d = s.head_dim;
  std::vector<double> out(static_cast<size_t>(s.batch * s.q_heads * d), 0.0);
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t h = 0; h < s.q_heads; ++h) {
      const int64_t kv = (b * s.kv_heads + h / group) * s.cache_len * d, qo = (b * s.q_heads + h) * d;
      const int64_t n = n_keys[b];
      if (n == 0) continue;
      std::vector<double> sc(static_cast<size_t>(n));
      double mx = -1e300, den = 0.0;
      for (int64_t j = 0; j < n; ++j) {
        double dot = 0.0;
        for (int64_t i = 0; i < d; ++i) dot += static_cast<double>(q[qo + i]) * k[kv + j * d + i];
        sc[j] = dot * scale;
        mx = std::max(mx, sc[j]);
      }
      for (int64_t j = 0; j < n; ++j) den += (sc[j] = std::exp(sc[j] - mx));
      for (int64_t j = 0; j < n; ++j)
        for (int64_t i = 0; i < d; ++i) out[qo + i] += sc[j] / den * v[kv + j * d + i];
    }
  }
  return out;
}

// n_keys: one per row, or empty for 0, 1, all and then (b * 7) % cache_len keys
void check_case(int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t d, int64_t cache_len, bool bf16,
                std::mt19937& rng, std::vector<int64_t> n_keys = {}) {
  const DecodeAttentionShape s{batch, q_heads, kv_heads, d, cache_len};
  auto q = r1_randn(rng, batch * q_heads * d);
  auto k = r1_randn(rng, batch * kv_heads * cache_len * d);
  auto v = r1_randn(rng, batch * kv_heads * cache_len * d);
  if (n_keys.empty()) {
    n_keys.resize(static_cast<size_t>(batch));
    for (int64_t b = 0; b < batch; ++b) n_keys[b] = b == 0 ? 0 : b == 1 ? 1 : b == 2 ? cache_len : (b * 7) % cache_len;
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<float> got(q.size());
  if (bf16) {  // round the inputs to bf16 first, so that the reference sees the same values
    auto to_bf = [](std::vector<float>& x) {
      std::vector<uint16_t> h(x.size());
      for (size_t i = 0; i < x.size(); ++i) x[i] = r1engine::bf16_to_float(h[i] = r1engine::float_to_bf16(x[i]));
      return h;
    };
    auto qh = to_bf(q), kh = to_bf(k), vh = to_bf(v);
    std::vector<uint16_t> oh(q.size());
    r1engine::decode_attention(qh.data(), kh.data(), vh.data(), n_keys.data(), oh.data(), s, scale, FloatType::kBF16);
    for (size_t i = 0; i < oh.size(); ++i) got[i] = r1engine::bf16_to_float(oh[i]);
  } else {
    r1engine::decode_attention(q.data(), k.data(), v.data(), n_keys.data(), got.data(), s, scale, FloatType::kF32);
    std::vector<float> again(q.size());  // deterministic: the same bits on a second call
    r1engine::decode_attention(q.data(), k.data(), v.data(), n_keys.data(), again.data(), s, scale, FloatType::kF32);
    R1_CHECK(again == got);
  }
  const auto ref = reference(q, k, v, n_keys, s, scale);
  const double tol = bf16 ? 1e-2 : 1e-5;
  for (size_t i = 0; i < ref.size(); ++i) R1_CHECK_NEAR(got[i], ref[i], tol);
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  for (bool bf16 : {false, true}) {
    check_case(5, 6, 2, 32, 40, bf16, rng);  // GQA 3:1, the demo model's heads
    check_case(4, 4, 4, 7, 9, bf16, rng);    // multi-head, odd head dim
    check_case(6, 2, 1, 16, 3, bf16, rng);   // tiny cache: 0, 1 and all keys
    // the AVX2 path: fixed head dims 32, 64, 128 and runtime ones (3 and 5 vectors of 8), key counts around the
    // blocks of 8 keys
    const std::vector<int64_t> around8{0, 1, 7, 8, 9, 15, 16, 17, 95, 100};
    check_case(10, 6, 2, 32, 100, bf16, rng, around8);
    check_case(10, 7, 1, 64, 100, bf16, rng, around8);
    check_case(10, 2, 2, 128, 100, bf16, rng, around8);
    check_case(10, 8, 2, 24, 100, bf16, rng, around8);
    check_case(10, 5, 1, 40, 100, bf16, rng, around8);
    // longer than one chunk of keys (512 for 1-8 query heads per KV head, 64 for 64): the online-softmax merge
    check_case(3, 2, 2, 32, 1200, bf16, rng, {1200, 513, 1025});
    check_case(3, 64, 1, 8, 200, bf16, rng, {200, 64, 65});
  }
  return r1_check_report("test_decode_attention");
}
