// Unit tests of the vocabulary passes of the GRPO-family losses, CPU kernel (csrc/core/grpo_loss.*): log-probs,
// log-sum-exp and entropy (online, with the live mask) and the backward with the entropy term, against
// double-precision references.
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
  double lse, logp, entropy;
};

// Double-precision log-sum-exp, log-prob and entropy of x[off : off + v] / temp (-inf entries have p = 0).
RefRow ref_row(const std::vector<float>& x, int64_t off, int64_t v, int64_t t, double temp) {
  double m = -INFINITY;
  for (int64_t j = 0; j < v; ++j) m = std::max(m, x[off + j] / temp);
  double s = 0;
  for (int64_t j = 0; j < v; ++j) s += std::exp(x[off + j] / temp - m);
  const double lse = m + std::log(s);
  double h = 0;
  for (int64_t j = 0; j < v; ++j) {
    const double lp = x[off + j] / temp - lse;
    if (lp != -INFINITY) h -= std::exp(lp) * lp;
  }
  return {lse, x[off + t] / temp - lse, h};
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

// Forward with and without the entropy and the live mask. Rows are laid out with a padding between them (row_stride
// > v), a few logits are -inf (p = 0: the entropy must stay finite) and, when v spans several chunks of the kernel,
// a whole chunk of a row is -inf.
void test_forward(FloatType dtype, int64_t n, int64_t v, float temp) {
  std::mt19937 rng(static_cast<unsigned>(n * 131 + v));
  const int64_t rs = v + 5;
  auto x = random_logits(rng, n * rs, 1, 3.0f);
  std::vector<int64_t> t(n);
  std::uniform_int_distribution<int64_t> ud(0, v - 1);
  for (auto& e : t) e = ud(rng);
  if (v > 3) {
    x[1] = -INFINITY;  // row 0
    if (t[0] == 1) t[0] = 0;
  }
  if (n > 2 && v > 6) {
    for (int64_t j = 0; j < v; j += 3) x[2 * rs + j] = -INFINITY;  // row 2: every third logit
    t[2] = 1;
  }
  if (n > 3 && v > 2100) {
    for (int64_t j = 0; j < 2100; ++j) x[3 * rs + j] = -INFINITY;  // row 3: the whole first chunk (and more)
    t[3] = v - 1;
  }
  std::vector<uint16_t> xb;
  if (dtype == FloatType::kBF16) xb = to_bf16(x);  // -inf stays -inf
  const void* ptr = dtype == FloatType::kF32 ? static_cast<const void*>(x.data()) : xb.data();
  std::vector<float> live(n, 1.0f);
  for (int64_t i = 1; i < n; i += 3) live[i] = 0.0f;
  for (bool use_live : {false, true}) {
    for (bool want_ent : {false, true}) {
      std::vector<float> logp(n, 42.0f), lse(n, 42.0f), ent(n, 42.0f);
      r1engine::token_logprobs_fwd(ptr, dtype, n, v, rs, t.data(), use_live ? live.data() : nullptr, temp,
                                   logp.data(), lse.data(), want_ent ? ent.data() : nullptr);
      for (int64_t i = 0; i < n; ++i) {
        if (use_live && live[i] == 0.0f) {
          R1_CHECK(logp[i] == 0.0f && lse[i] == 0.0f);
          if (want_ent) R1_CHECK(ent[i] == 0.0f);
          continue;
        }
        const RefRow r = ref_row(x, i * rs, v, t[i], temp);
        R1_CHECK_NEAR(lse[i], r.lse, 2e-6);
        R1_CHECK_NEAR(logp[i], r.logp, 2e-6);
        if (want_ent) {
          R1_CHECK(std::isfinite(ent[i]));
          R1_CHECK_NEAR(ent[i], r.entropy, 2e-5);
        } else {
          R1_CHECK(ent[i] == 42.0f);  // not written
        }
      }
    }
  }
}

// Rows that are not live are never read (NaN there leaks into nothing); entropy of a uniform and a one-hot row.
void test_live_rows_are_not_read() {
  const int64_t n = 4, v = 5000;
  std::mt19937 rng(11);
  auto x = random_logits(rng, n, v, 1.0f);
  for (int64_t j = 0; j < v; ++j) {
    x[1 * v + j] = NAN;
    x[2 * v + j] = 0.5f;                     // uniform: H = log(v)
    x[3 * v + j] = j == 7 ? 0.0f : -INFINITY;  // one-hot: H = 0, logp = 0
  }
  std::vector<int64_t> t = {3, 4, 5, 7};
  std::vector<float> live = {1.0f, 0.0f, 2.0f, 1.0f};  // any non-zero value is live
  std::vector<float> logp(n), lse(n), ent(n);
  r1engine::token_logprobs_fwd(x.data(), FloatType::kF32, n, v, v, t.data(), live.data(), 1.0f, logp.data(),
                               lse.data(), ent.data());
  R1_CHECK(logp[1] == 0.0f && lse[1] == 0.0f && ent[1] == 0.0f);
  R1_CHECK_NEAR(ent[0], ref_row(x, 0, v, t[0], 1.0).entropy, 2e-5);
  R1_CHECK_NEAR(ent[2], std::log(static_cast<double>(v)), 2e-6);
  R1_CHECK_NEAR(lse[2], 0.5 + std::log(static_cast<double>(v)), 2e-6);
  R1_CHECK(ent[3] == 0.0f);
  R1_CHECK(logp[3] == 0.0f);
}

void test_nonfinite() {
  const int64_t v = 3000;
  std::mt19937 rng(7);
  auto x = random_logits(rng, 3, v, 1.0f);
  x[0 * v + 2500] = NAN;
  x[1 * v + 17] = INFINITY;
  std::vector<int64_t> t = {0, 0, 0};
  for (bool want_ent : {false, true}) {
    std::vector<float> logp(3), lse(3), ent(3);
    r1engine::token_logprobs_fwd(x.data(), FloatType::kF32, 3, v, v, t.data(), nullptr, 1.0f, logp.data(),
                                 lse.data(), want_ent ? ent.data() : nullptr);
    R1_CHECK(std::isnan(lse[0]));
    R1_CHECK(!std::isfinite(lse[1]));
    R1_CHECK(std::isfinite(lse[2]));
    if (want_ent) R1_CHECK(std::isfinite(ent[2]));
    R1_CHECK(r1engine::first_nonfinite(lse.data(), nullptr, 3) == 0);
    std::vector<float> w = {0.0f, 1.0f, 1.0f};
    R1_CHECK(r1engine::first_nonfinite(lse.data(), w.data(), 3) == 1);
  }
  std::vector<int64_t> bad = {0, v, 1};
  R1_CHECK(r1engine::first_invalid_target(bad.data(), 3, v) == 1);
  R1_CHECK(r1engine::first_invalid_target(t.data(), 3, v) == -1);
}

template <class T>
void run_bwd(const std::vector<T>& x, FloatType dtype, int64_t n, int64_t v, const std::vector<int64_t>& t,
             const std::vector<float>& lse, const std::vector<float>& g, const float* dent, const float* ent,
             float temp, std::vector<T>& out, bool inplace) {
  if (inplace) {
    out = x;
    r1engine::logprobs_bwd(out.data(), dtype, n, v, v, t.data(), lse.data(), g.data(), dent, ent, temp, out.data(),
                           v);
  } else {
    out.assign(x.size(), T(1));
    r1engine::logprobs_bwd(x.data(), dtype, n, v, v, t.data(), lse.data(), g.data(), dent, ent, temp, out.data(), v);
  }
}

// Backward with and without the entropy term; dlogp and dentropy each 0 on some rows (both 0 on some), -inf logits
// in row 0 and NaN logits in a row whose dlogp and dentropy are both 0 (not read).
void test_backward(FloatType dtype, int64_t n, int64_t v, float temp, bool with_entropy) {
  std::mt19937 rng(static_cast<unsigned>(v * 7 + n));
  auto x = random_logits(rng, n, v, 2.0f);
  std::vector<int64_t> t(n);
  std::uniform_int_distribution<int64_t> ud(0, v - 1);
  for (auto& e : t) e = ud(rng);
  if (v > 4) {
    x[0] = x[3] = -INFINITY;
    t[0] = 1;
  }
  std::vector<float> lse(n), g(n), de(n), ent(n);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int64_t i = 0; i < n; ++i) {
    g[i] = (i % 3 == 1) ? 0.0f : nd(rng);
    de[i] = (i % 2 == 1) ? 0.0f : nd(rng);
  }
  const int64_t nan_row = n > 1 ? 1 : -1;  // i = 1: g = 0 and de = 0 (not read)
  if (nan_row >= 0)
    for (int64_t j = 0; j < v; ++j) x[nan_row * v + j] = NAN;
  std::vector<uint16_t> xb;
  if (dtype == FloatType::kBF16) xb = to_bf16(x);
  for (int64_t i = 0; i < n; ++i) {
    if (i == nan_row) continue;
    const RefRow r = ref_row(x, i * v, v, t[i], temp);
    lse[i] = static_cast<float>(r.lse);
    ent[i] = static_cast<float>(r.entropy);
  }
  const float* dent = with_entropy ? de.data() : nullptr;
  const float* entp = with_entropy ? ent.data() : nullptr;
  for (bool inplace : {false, true}) {
    std::vector<float> grad(n * v);
    if (dtype == FloatType::kF32) {
      std::vector<float> out;
      run_bwd(x, dtype, n, v, t, lse, g, dent, entp, temp, out, inplace);
      grad = out;
    } else {
      std::vector<uint16_t> out;
      run_bwd(xb, dtype, n, v, t, lse, g, dent, entp, temp, out, inplace);
      for (size_t k = 0; k < out.size(); ++k) grad[k] = r1engine::bf16_to_float(out[k]);
    }
    const double tol = dtype == FloatType::kF32 ? 2e-6 : 8e-3;
    for (int64_t i = 0; i < n; ++i) {
      const double e = with_entropy ? de[i] : 0.0;
      double rowsum = 0;
      for (int64_t j = 0; j < v; ++j) {
        const double lp = x[i * v + j] / temp - lse[i];
        const double p = std::exp(lp);
        double want = 0.0;
        if (g[i] != 0.0f || e != 0.0) {
          want = ((j == t[i] ? 1.0 : 0.0) - p) * g[i] / temp;
          if (p > 0.0) want -= e * p * (lp + ent[i]) / temp;
        }
        R1_CHECK(std::isfinite(grad[i * v + j]));
        R1_CHECK_NEAR(grad[i * v + j], want, tol);
        rowsum += grad[i * v + j];
      }
      if (dtype == FloatType::kF32) R1_CHECK_NEAR(rowsum, 0.0, 1e-5);  // both terms sum to 0 over the row
    }
  }
}

// The entropy gradient against a central finite difference of the (double) entropy of one row.
void test_entropy_gradient_fd() {
  const int64_t v = 37;
  const float temp = 0.8f;
  std::mt19937 rng(5);
  auto x = random_logits(rng, 1, v, 1.5f);
  std::vector<int64_t> t = {4};
  const RefRow r = ref_row(x, 0, v, t[0], temp);
  std::vector<float> lse = {static_cast<float>(r.lse)}, ent = {static_cast<float>(r.entropy)};
  std::vector<float> g = {0.0f}, de = {1.0f};
  std::vector<float> grad(v);
  r1engine::logprobs_bwd(x.data(), FloatType::kF32, 1, v, v, t.data(), lse.data(), g.data(), de.data(), ent.data(),
                         temp, grad.data(), v);
  for (int64_t j = 0; j < v; ++j) {
    const float h = 1e-3f;
    auto xp = x, xm = x;
    xp[j] += h;
    xm[j] -= h;
    const double fd = (ref_row(xp, 0, v, 0, temp).entropy - ref_row(xm, 0, v, 0, temp).entropy) /
                      (static_cast<double>(xp[j]) - xm[j]);
    R1_CHECK_NEAR(grad[j], fd, 1e-4);
  }
}

}  // namespace

int main() {
  test_bf16_roundtrip();
  for (FloatType dt : {FloatType::kF32, FloatType::kBF16}) {
    for (int64_t v : {1, 7, 123, 1000, 4099, 32000}) {
      test_forward(dt, v > 5000 ? 4 : 9, v, 1.0f);
      test_forward(dt, 5, v, 0.7f);
      for (bool with_entropy : {false, true})
        test_backward(dt, v > 5000 ? 3 : 5, v, v == 123 ? 0.6f : 1.0f, with_entropy);
    }
  }
  test_live_rows_are_not_read();
  test_nonfinite();
  test_entropy_gradient_fd();
  return r1_check_report("test_grpo_loss");
}
