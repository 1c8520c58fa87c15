// Unit tests of the fused GRPO loss CPU kernel (csrc/core/grpo_loss.*) against double-precision references.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "core/grpo_loss.h"
#include "tests/check.h"

using r1engine::FloatType;

namespace {

struct RefRow {
  double lse, logp;
};

RefRow ref_row(const std::vector<float>& x, int64_t off, int64_t v, int64_t t, double temp) {
  double m = -INFINITY;
  for (int64_t j = 0; j < v; ++j) m = std::max(m, x[off + j] / temp);
  double s = 0;
  for (int64_t j = 0; j < v; ++j) s += std::exp(x[off + j] / temp - m);
  const double lse = m + std::log(s);
  return {lse, x[off + t] / temp - lse};
}

std::vector<float> random_logits(std::mt19937& rng, int64_t n, int64_t v, float scale) {
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> x(n * v);
  for (auto& e : x) e = nd(rng);
  return x;
}

std::vector<uint16_t> to_bf16(std::vector<float>& x) {  // also rounds x to the bf16 values
  std::vector<uint16_t> h(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    h[i] = r1engine::float_to_bf16(x[i]);
    x[i] = r1engine::bf16_to_float(h[i]);
  }
  return h;
}

void test_bf16_roundtrip() {
  R1_CHECK(r1engine::bf16_to_float(r1engine::float_to_bf16(1.0f)) == 1.0f);
  R1_CHECK(r1engine::bf16_to_float(r1engine::float_to_bf16(-3.5f)) == -3.5f);
  // 1 + 2^-8 is exactly halfway between bf16 1 and 1 + 2^-7: ties to even (1.0).
  R1_CHECK(r1engine::bf16_to_float(r1engine::float_to_bf16(1.0f + 1.0f / 256)) == 1.0f);
  R1_CHECK(std::isnan(r1engine::bf16_to_float(r1engine::float_to_bf16(NAN))));
}

void test_forward(FloatType dtype, int64_t n, int64_t v, float temp) {
  std::mt19937 rng(static_cast<unsigned>(n * 131 + v));
  auto x = random_logits(rng, n, v, 3.0f);
  std::vector<uint16_t> xb;
  if (dtype == FloatType::kBF16) xb = to_bf16(x);
  std::vector<int64_t> t(n);
  std::uniform_int_distribution<int64_t> ud(0, v - 1);
  for (auto& e : t) e = ud(rng);
  // An extra-large padding between rows checks row_stride; a -inf entry checks masking.
  const int64_t rs = v;
  if (v > 3) x[1] = -INFINITY;
  if (dtype == FloatType::kBF16 && v > 3) xb[1] = 0xff80;  // -inf
  if (t[0] == 1) t[0] = 0;
  std::vector<float> logp(n), lse(n);
  const void* ptr = dtype == FloatType::kF32 ? static_cast<const void*>(x.data()) : xb.data();
  r1engine::token_logprobs_fwd(ptr, dtype, n, v, rs, t.data(), temp, logp.data(), lse.data());
  for (int64_t i = 0; i < n; ++i) {
    const RefRow r = ref_row(x, i * rs, v, t[i], temp);
    R1_CHECK_NEAR(lse[i], r.lse, 2e-6);
    R1_CHECK_NEAR(logp[i], r.logp, 2e-6);
  }
}

void test_nonfinite() {
  const int64_t v = 3000;
  std::mt19937 rng(7);
  auto x = random_logits(rng, 3, v, 1.0f);
  x[0 * v + 2500] = NAN;
  x[1 * v + 17] = INFINITY;
  std::vector<int64_t> t = {0, 0, 0};
  std::vector<float> logp(3), lse(3);
  r1engine::token_logprobs_fwd(x.data(), FloatType::kF32, 3, v, v, t.data(), 1.0f, logp.data(), lse.data());
  R1_CHECK(std::isnan(lse[0]));
  R1_CHECK(!std::isfinite(lse[1]));
  R1_CHECK(std::isfinite(lse[2]));
  R1_CHECK(r1engine::first_nonfinite(lse.data(), nullptr, 3) == 0);
  std::vector<float> w = {0.0f, 1.0f, 1.0f};
  R1_CHECK(r1engine::first_nonfinite(lse.data(), w.data(), 3) == 1);
  std::vector<int64_t> bad = {0, v, 1};
  R1_CHECK(r1engine::first_invalid_target(bad.data(), 3, v) == 1);
  R1_CHECK(r1engine::first_invalid_target(t.data(), 3, v) == -1);
}

void test_grpo_token() {
  r1engine::GrpoHyper h;
  h.eps_low = 0.2f;
  h.eps_high = 0.28f;
  // Inside the trust region: s = ratio * A, ds = A * ratio.
  auto r = r1engine::grpo_token(-1.0f, 2.0f, true, -1.1f, false, 0.0f, 0.5f, h);
  const double ratio = std::exp(0.1);
  R1_CHECK_NEAR(r.ratio, ratio, 1e-6);
  R1_CHECK_NEAR(r.loss, -0.5 * ratio * 2.0, 1e-6);
  R1_CHECK_NEAR(r.dlogp, -0.5 * 2.0 * ratio, 1e-6);
  R1_CHECK(r.clipped == 0.0f);
  // ratio > 1 + eps_high with A > 0: clipped, zero gradient.
  r = r1engine::grpo_token(0.0f, 1.5f, true, -1.0f, false, 0.0f, 1.0f, h);
  R1_CHECK(r.clipped == 1.0f);
  R1_CHECK_NEAR(r.loss, -1.28 * 1.5, 1e-6);
  R1_CHECK(r.dlogp == 0.0f);
  // ratio > 1 + eps_high with A < 0: not clipped (pessimistic branch is the unclipped one).
  r = r1engine::grpo_token(0.0f, -1.5f, true, -1.0f, false, 0.0f, 1.0f, h);
  R1_CHECK(r.clipped == 0.0f);
  R1_CHECK_NEAR(r.loss, std::exp(1.0) * 1.5, 1e-6);
  // Dual-clip at 2: ratio e > 2 with A < 0 caps the loss at -dual*A.
  h.dual_clip = 2.0f;
  r = r1engine::grpo_token(0.0f, -1.5f, true, -1.0f, false, 0.0f, 1.0f, h);
  R1_CHECK(r.clipped == 1.0f);
  R1_CHECK_NEAR(r.loss, 3.0, 1e-6);
  R1_CHECK(r.dlogp == 0.0f);
  // On-policy + k3 KL.
  h.dual_clip = 0.0f;
  h.beta = 0.1f;
  for (int k = 1; k <= 3; ++k) {
    h.kl_estimator = k;
    r = r1engine::grpo_token(-2.0f, 0.7f, false, 0.0f, true, -1.5f, 1.0f, h);
    const double d = 0.5;
    const double kl = k == 1 ? -d : (k == 2 ? 0.5 * d * d : std::exp(d) - d - 1);
    const double dkl = k == 1 ? 1.0 : (k == 2 ? -d : 1 - std::exp(d));
    R1_CHECK_NEAR(r.ratio, 1.0, 0);
    R1_CHECK_NEAR(r.kl, kl, 1e-6);
    R1_CHECK_NEAR(r.loss, -0.7 + 0.1 * kl, 1e-6);
    R1_CHECK_NEAR(r.dlogp, -0.7 + 0.1 * dkl, 1e-6);
  }
}

void test_grpo_fwd_skips_masked() {
  const int64_t n = 5, v = 777;
  std::mt19937 rng(3);
  auto x = random_logits(rng, n, v, 2.0f);
  std::vector<int64_t> t = {1, 2, 3, 4, 5};
  std::vector<float> adv = {1, -1, 0.5f, 2, -0.3f}, w = {1, 0, 0.5f, 0, 0.25f}, old(n, -7.0f);
  std::vector<float> o[7];
  for (auto& e : o) e.assign(n, 42.0f);
  r1engine::GrpoOutputs out{o[0].data(), o[1].data(), o[2].data(), o[3].data(), o[4].data(), o[5].data(),
                            o[6].data()};
  r1engine::GrpoHyper h;
  r1engine::grpo_fwd(x.data(), FloatType::kF32, n, v, v, t.data(), adv.data(), old.data(), nullptr, w.data(), h, out);
  for (int64_t i = 0; i < n; ++i) {
    if (w[i] == 0.0f) {
      R1_CHECK(o[0][i] == 0.0f && o[1][i] == 0.0f && o[3][i] == 0.0f && o[4][i] == 1.0f && o[6][i] == 0.0f);
    } else {
      const RefRow r = ref_row(x, i * v, v, t[i], 1.0);
      R1_CHECK_NEAR(o[1][i], r.logp, 2e-6);
      auto tok = r1engine::grpo_token(o[1][i], adv[i], true, old[i], false, 0, w[i], h);
      R1_CHECK_NEAR(o[0][i], tok.loss, 1e-6);
    }
  }
}

template <class T>
void run_bwd(const std::vector<T>& x, FloatType dtype, int64_t n, int64_t v, const std::vector<int64_t>& t,
             const std::vector<float>& lse, const std::vector<float>& g, float temp, std::vector<T>& out,
             bool inplace) {
  if (inplace) {
    out = x;
    r1engine::logprobs_bwd(out.data(), dtype, n, v, v, t.data(), lse.data(), g.data(), temp, out.data(), v);
  } else {
    out.assign(x.size(), T(1));
    r1engine::logprobs_bwd(x.data(), dtype, n, v, v, t.data(), lse.data(), g.data(), temp, out.data(), v);
  }
}

void test_backward(FloatType dtype, int64_t n, int64_t v, float temp) {
  std::mt19937 rng(static_cast<unsigned>(v * 7 + n));
  auto x = random_logits(rng, n, v, 2.0f);
  std::vector<uint16_t> xb;
  if (dtype == FloatType::kBF16) xb = to_bf16(x);
  std::vector<int64_t> t(n);
  std::uniform_int_distribution<int64_t> ud(0, v - 1);
  for (auto& e : t) e = ud(rng);
  std::vector<float> lse(n), g(n);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int64_t i = 0; i < n; ++i) {
    lse[i] = static_cast<float>(ref_row(x, i * v, v, t[i], temp).lse);
    g[i] = (i % 3 == 1) ? 0.0f : nd(rng);
  }
  for (bool inplace : {false, true}) {
    std::vector<float> grad(n * v);
    if (dtype == FloatType::kF32) {
      std::vector<float> out;
      run_bwd(x, dtype, n, v, t, lse, g, temp, out, inplace);
      grad = out;
    } else {
      std::vector<uint16_t> out;
      run_bwd(xb, dtype, n, v, t, lse, g, temp, out, inplace);
      for (size_t k = 0; k < out.size(); ++k) grad[k] = r1engine::bf16_to_float(out[k]);
    }
    const double tol = dtype == FloatType::kF32 ? 2e-6 : 8e-3;
    for (int64_t i = 0; i < n; ++i) {
      double rowsum = 0;
      for (int64_t j = 0; j < v; ++j) {
        const double p = std::exp(x[i * v + j] / temp - lse[i]);
        const double want = ((j == t[i] ? 1.0 : 0.0) - p) * g[i] / temp;
        R1_CHECK_NEAR(grad[i * v + j], want, tol);
        rowsum += grad[i * v + j];
      }
      if (dtype == FloatType::kF32) R1_CHECK_NEAR(rowsum, 0.0, 1e-5);
    }
  }
}

}  // namespace

int main() {
  test_bf16_roundtrip();
  for (FloatType dt : {FloatType::kF32, FloatType::kBF16}) {
    for (int64_t v : {1, 7, 123, 1000, 4099, 32000}) {
      test_forward(dt, v > 5000 ? 3 : 9, v, 1.0f);
      test_forward(dt, 5, v, 0.7f);
      test_backward(dt, v > 5000 ? 2 : 5, v, v == 123 ? 0.6f : 1.0f);
    }
  }
  test_nonfinite();
  test_grpo_token();
  test_grpo_fwd_skips_masked();
  return r1_check_report("test_grpo_loss");
}
