// Unit tests of the packed varlen attention (csrc/core/varlen_attention.*), forward and backward, against a naive
// double-precision implementation: empty and length-1 sequences, lengths around the 6-row tile and 8/16-column
// vectors, one sequence long enough to be processed in row blocks, GQA groups 1/3/8, head dims 8/24/32/7 (7: the
// zero-padded lanes), causal and not, fp32 and bf16. The backward is also run twice and must repeat bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "core/varlen_attention.h"
#include "tests/check.h"

using r1engine::FloatType;
using r1engine::VarlenAttentionShape;

namespace {

struct Ref {
  std::vector<double> out, lse, dq, dk, dv;
};

// Per (sequence, query head): S = scale q k^T (causal mask), P = softmax(S), O = P v and its gradients given dO.
Ref reference(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
              const std::vector<float>& dout, const std::vector<int32_t>& cu, const VarlenAttentionShape& s,
              double scale, bool causal) {
  const int64_t hq = s.q_heads, hkv = s.kv_heads, d = s.head_dim, group = hq / hkv;
  Ref r;
  r.out.assign(q.size(), 0.0), r.dq.assign(q.size(), 0.0), r.dk.assign(k.size(), 0.0), r.dv.assign(k.size(), 0.0);
  r.lse.assign(static_cast<size_t>(s.total * hq), 0.0);
  auto qi = [&](int64_t t, int64_t h) { return (t * hq + h) * d; };
  auto ki = [&](int64_t t, int64_t h) { return (t * hkv + h / group) * d; };
  for (int64_t b = 0; b < s.num_seqs; ++b) {
    const int64_t a = cu[b], n = cu[b + 1] - cu[b];
    for (int64_t h = 0; h < hq; ++h) {
      std::vector<double> p(static_cast<size_t>(n * n), 0.0), dp(static_cast<size_t>(n * n), 0.0);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t len = causal ? i + 1 : n;
        double mx = -1e300, den = 0.0;
        for (int64_t j = 0; j < len; ++j) {
          double dot = 0.0;
          for (int64_t x = 0; x < d; ++x) dot += static_cast<double>(q[qi(a + i, h) + x]) * k[ki(a + j, h) + x];
          p[i * n + j] = dot * scale;
          mx = std::max(mx, p[i * n + j]);
        }
        for (int64_t j = 0; j < len; ++j) den += (p[i * n + j] = std::exp(p[i * n + j] - mx));
        r.lse[(a + i) * hq + h] = mx + std::log(den);
        for (int64_t j = 0; j < len; ++j) {
          p[i * n + j] /= den;
          for (int64_t x = 0; x < d; ++x) r.out[qi(a + i, h) + x] += p[i * n + j] * v[ki(a + j, h) + x];
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        double delta = 0.0;
        for (int64_t x = 0; x < d; ++x) delta += dout[qi(a + i, h) + x] * r.out[qi(a + i, h) + x];
        for (int64_t j = 0; j < (causal ? i + 1 : n); ++j) {
          double dpij = 0.0;
          for (int64_t x = 0; x < d; ++x) {
            dpij += static_cast<double>(dout[qi(a + i, h) + x]) * v[ki(a + j, h) + x];
            r.dv[ki(a + j, h) + x] += p[i * n + j] * dout[qi(a + i, h) + x];
          }
          const double dsij = p[i * n + j] * (dpij - delta) * scale;
          for (int64_t x = 0; x < d; ++x) {
            r.dq[qi(a + i, h) + x] += dsij * k[ki(a + j, h) + x];
            r.dk[ki(a + j, h) + x] += dsij * q[qi(a + i, h) + x];
          }
        }
      }
    }
  }
  return r;
}

std::vector<uint16_t> to_bf16(std::vector<float>& x) {  // rounds x in place too, so the reference sees the same
  std::vector<uint16_t> h(x.size());
  for (size_t i = 0; i < x.size(); ++i) x[i] = r1engine::bf16_to_float(h[i] = r1engine::float_to_bf16(x[i]));
  return h;
}

std::vector<float> from_bf16(const std::vector<uint16_t>& h) {
  std::vector<float> x(h.size());
  for (size_t i = 0; i < h.size(); ++i) x[i] = r1engine::bf16_to_float(h[i]);
  return x;
}

void check_all(const std::vector<float>& got, const std::vector<double>& want, double tol) {
  for (size_t i = 0; i < want.size(); ++i) R1_CHECK_NEAR(got[i], want[i], tol);
}

void check_case(const std::vector<int32_t>& lengths, int64_t hq, int64_t hkv, int64_t d, bool causal, bool bf16,
                std::mt19937& rng) {
  std::vector<int32_t> cu{0};
  for (int32_t n : lengths) cu.push_back(cu.back() + n);
  const int64_t total = cu.back();
  const VarlenAttentionShape s{total, static_cast<int64_t>(lengths.size()), hq, hkv, d};
  auto q = r1_randn(rng, total * hq * d), k = r1_randn(rng, total * hkv * d), v = r1_randn(rng, total * hkv * d);
  auto dout = r1_randn(rng, total * hq * d);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<float> out(q.size()), lse(static_cast<size_t>(total * hq)), dq(q.size()), dk(k.size()), dv(k.size());
  if (bf16) {
    auto qh = to_bf16(q), kh = to_bf16(k), vh = to_bf16(v), doh = to_bf16(dout);
    std::vector<uint16_t> oh(q.size()), dqh(q.size()), dkh(k.size()), dvh(k.size());
    r1engine::varlen_attention_fwd(qh.data(), kh.data(), vh.data(), cu.data(), oh.data(), lse.data(), s, scale,
                                   causal, FloatType::kBF16);
    r1engine::varlen_attention_bwd(doh.data(), qh.data(), kh.data(), vh.data(), oh.data(), lse.data(), cu.data(),
                                   dqh.data(), dkh.data(), dvh.data(), s, scale, causal, FloatType::kBF16);
    out = from_bf16(oh), dq = from_bf16(dqh), dk = from_bf16(dkh), dv = from_bf16(dvh);
  } else {
    r1engine::varlen_attention_fwd(q.data(), k.data(), v.data(), cu.data(), out.data(), lse.data(), s, scale, causal,
                                   FloatType::kF32);
    r1engine::varlen_attention_bwd(dout.data(), q.data(), k.data(), v.data(), out.data(), lse.data(), cu.data(),
                                   dq.data(), dk.data(), dv.data(), s, scale, causal, FloatType::kF32);
    std::vector<float> dq2(q.size()), dk2(k.size()), dv2(k.size());  // deterministic: the same bits again
    r1engine::varlen_attention_bwd(dout.data(), q.data(), k.data(), v.data(), out.data(), lse.data(), cu.data(),
                                   dq2.data(), dk2.data(), dv2.data(), s, scale, causal, FloatType::kF32);
    R1_CHECK(dq2 == dq && dk2 == dk && dv2 == dv);
  }
  const auto ref = reference(q, k, v, dout, cu, s, scale, causal);
  // bf16 outputs carry ~3 significant digits; gradients sum over many products of rounded values
  const double tol = bf16 ? 2e-2 : 2e-5, gtol = bf16 ? 5e-2 : 5e-5;
  check_all(out, ref.out, tol);
  check_all(lse, ref.lse, bf16 ? 1e-4 : 1e-5);  // lse is fp32 from the (rounded) inputs in both cases
  check_all(dq, ref.dq, gtol);
  check_all(dk, ref.dk, gtol);
  check_all(dv, ref.dv, gtol);
}

}  // namespace

int main() {
  std::mt19937 rng(11);
  const std::vector<int32_t> mixed{1, 0, 2, 7, 33, 0, 6, 13, 64, 17, 9};
  for (bool bf16 : {false, true}) {
    for (bool causal : {true, false}) {
      check_case(mixed, 6, 2, 32, causal, bf16, rng);  // GQA 3:1, the demo model's heads
      check_case(mixed, 4, 4, 24, causal, bf16, rng);  // one 16-lane + one 8-lane column tile
      check_case(mixed, 8, 1, 8, causal, bf16, rng);   // 8 query heads per KV head
      check_case({5, 1, 12}, 2, 1, 7, causal, bf16, rng);  // head_dim padded with zero lanes
    }
  }
  // long enough for row blocks (n * n_pad > 2^18 floats): blocks of query rows, dK/dV summed across blocks
  check_case({600, 3}, 2, 1, 16, true, false, rng);
  check_case({530}, 1, 1, 8, false, false, rng);
  return r1_check_report("test_varlen_attention");
}
