// Unit tests of the fused AdamW step and gradient norm (csrc/core/adamw.*) against a scalar double-precision
// reference of the same math, over several steps, odd sizes (vector bodies plus scalar tails, several chunks),
// weight decay on and off, a gradient scale, bf16 parameters with fp32 state, and tensors that skip steps.
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "core/adamw.h"
#include "tests/check.h"

using r1engine::AdamWHyper;
using r1engine::AdamWTensor;
using r1engine::FloatType;

namespace {

struct RefState {
  std::vector<double> p, m, v;
};

void ref_step(RefState& st, const std::vector<float>& grad, int64_t step, const AdamWHyper& h, double gs) {
  const double bc1 = 1.0 - std::pow(h.beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(h.beta2, static_cast<double>(step));
  for (size_t i = 0; i < st.p.size(); ++i) {
    const double g = grad[i] * gs;
    st.p[i] *= 1.0 - h.lr * h.weight_decay;
    st.m[i] = h.beta1 * st.m[i] + (1.0 - h.beta1) * g;
    st.v[i] = h.beta2 * st.v[i] + (1.0 - h.beta2) * g * g;
    st.p[i] -= h.lr / bc1 * st.m[i] / (std::sqrt(st.v[i]) / std::sqrt(bc2) + h.eps);
  }
}

// Several fp32 tensors of odd sizes updated together for `steps` steps; tensor 1 has no gradient on even steps.
void test_fp32(double weight_decay, double beta1, float grad_scale) {
  const std::vector<int64_t> sizes = {1, 7, 8, 13, 1000, r1engine::kAdamWChunk * 2 + 5};
  AdamWHyper h;
  h.lr = 1e-2;
  h.beta1 = beta1;
  h.weight_decay = weight_decay;
  std::mt19937 rng(static_cast<unsigned>(weight_decay * 1000 + beta1 * 10));
  const size_t nt = sizes.size();
  std::vector<std::vector<float>> p(nt), m(nt), v(nt);
  std::vector<RefState> ref(nt);
  std::vector<int64_t> steps(nt, 0);
  for (size_t t = 0; t < nt; ++t) {
    p[t] = r1_randn(rng, sizes[t], 1.0f);
    m[t].assign(p[t].size(), 0.0f);
    v[t].assign(p[t].size(), 0.0f);
    ref[t] = {std::vector<double>(p[t].begin(), p[t].end()), std::vector<double>(p[t].size(), 0.0),
              std::vector<double>(p[t].size(), 0.0)};
  }
  for (int step = 1; step <= 5; ++step) {
    std::vector<std::vector<float>> g(nt);
    std::vector<AdamWTensor> batch;
    for (size_t t = 0; t < nt; ++t) {
      if (t == 1 && step % 2 == 0) continue;  // "grad is None": neither updated nor counted
      g[t] = r1_randn(rng, sizes[t], 0.1f * static_cast<float>(t + 1));
      ++steps[t];
      batch.push_back({p[t].data(), g[t].data(), m[t].data(), v[t].data(), sizes[t], steps[t], FloatType::kF32});
      ref_step(ref[t], g[t], steps[t], h, grad_scale);
    }
    r1engine::adamw_step(batch.data(), static_cast<int64_t>(batch.size()), h, grad_scale);
  }
  for (size_t t = 0; t < nt; ++t) {
    // Moments: error relative to the tensor's largest moment (m passes through 0, so no per-element relative).
    double max_err = 0.0, max_m = 0.0, max_v = 0.0, scale_m = 0.0, scale_v = 0.0;
    for (size_t i = 0; i < p[t].size(); ++i) {
      scale_m = std::max(scale_m, std::fabs(ref[t].m[i]));
      scale_v = std::max(scale_v, std::fabs(ref[t].v[i]));
    }
    for (size_t i = 0; i < p[t].size(); ++i) {
      max_err = std::max(max_err, std::fabs(p[t][i] - ref[t].p[i]) / (1.0 + std::fabs(ref[t].p[i])));
      max_m = std::max(max_m, std::fabs(m[t][i] - ref[t].m[i]) / scale_m);
      max_v = std::max(max_v, std::fabs(v[t][i] - ref[t].v[i]) / scale_v);
    }
    R1_CHECK_NEAR(max_err, 0.0, 2e-6);
    R1_CHECK_NEAR(max_m, 0.0, 5e-6);
    R1_CHECK_NEAR(max_v, 0.0, 5e-6);
    R1_CHECK(steps[t] == (t == 1 ? 3 : 5));
  }
}

// bf16 parameters and gradients with fp32 state: each step equals the fp32 math on the bf16 values, rounded to
// bf16 (to nearest even) at the end; checked step by step against the fp32 kernel on the same inputs.
void test_bf16() {
  const int64_t n = 4099;
  AdamWHyper h;
  h.lr = 3e-3;
  h.weight_decay = 0.1;
  std::mt19937 rng(7);
  std::vector<float> p32 = r1_randn(rng, n, 1.0f);
  std::vector<uint16_t> pb(n);
  for (int64_t i = 0; i < n; ++i) {
    pb[i] = r1engine::float_to_bf16(p32[i]);
    p32[i] = r1engine::bf16_to_float(pb[i]);
  }
  std::vector<float> mb(n, 0.0f), vb(n, 0.0f), m32(n, 0.0f), v32(n, 0.0f);
  int64_t mismatches = 0;
  for (int64_t step = 1; step <= 4; ++step) {
    std::vector<float> g32 = r1_randn(rng, n, 0.05f);
    std::vector<uint16_t> gb(n);
    for (int64_t i = 0; i < n; ++i) {
      gb[i] = r1engine::float_to_bf16(g32[i]);
      g32[i] = r1engine::bf16_to_float(gb[i]);
    }
    AdamWTensor tb{pb.data(), gb.data(), mb.data(), vb.data(), n, step, FloatType::kBF16};
    AdamWTensor tf{p32.data(), g32.data(), m32.data(), v32.data(), n, step, FloatType::kF32};
    r1engine::adamw_step(&tb, 1, h, 1.0f);
    r1engine::adamw_step(&tf, 1, h, 1.0f);
    for (int64_t i = 0; i < n; ++i) {
      if (pb[i] != r1engine::float_to_bf16(p32[i])) ++mismatches;
      if (mb[i] != m32[i] || vb[i] != v32[i]) ++mismatches;
      p32[i] = r1engine::bf16_to_float(pb[i]);  // continue both from the bf16 parameter
    }
  }
  R1_CHECK(mismatches == 0);
  // NaN survives the bf16 store.
  std::vector<uint16_t> pn = {r1engine::float_to_bf16(1.0f)};
  std::vector<uint16_t> gn = {r1engine::float_to_bf16(NAN)};
  float mn = 0.0f, vn = 0.0f;
  AdamWTensor tn{pn.data(), gn.data(), &mn, &vn, 1, 1, FloatType::kBF16};
  r1engine::adamw_step(&tn, 1, h, 1.0f);
  R1_CHECK(std::isnan(r1engine::bf16_to_float(pn[0])));
}

void test_grad_norm() {
  std::mt19937 rng(3);
  const std::vector<int64_t> sizes = {3, 31, 1025, r1engine::kAdamWChunk + 33};
  std::vector<std::vector<float>> g;
  std::vector<r1engine::GradView> views;
  double ref = 0.0;
  for (int64_t n : sizes) {
    g.push_back(r1_randn(rng, n, 2.0f));
    for (float x : g.back()) ref += static_cast<double>(x) * x;
  }
  for (size_t t = 0; t < g.size(); ++t) views.push_back({g[t].data(), sizes[t], FloatType::kF32});
  const double got = r1engine::grad_sq_norm(views.data(), static_cast<int64_t>(views.size()));
  R1_CHECK_NEAR(got, ref, 1e-6);
  // bf16 gradients.
  std::vector<uint16_t> hb(g[2].size());
  double refb = 0.0;
  for (size_t i = 0; i < hb.size(); ++i) {
    hb[i] = r1engine::float_to_bf16(g[2][i]);
    const double x = r1engine::bf16_to_float(hb[i]);
    refb += x * x;
  }
  r1engine::GradView vb{hb.data(), static_cast<int64_t>(hb.size()), FloatType::kBF16};
  R1_CHECK_NEAR(r1engine::grad_sq_norm(&vb, 1), refb, 1e-6);
  // A non-finite gradient gives a non-finite norm; no tensors gives 0.
  g[0][1] = INFINITY;
  R1_CHECK(!std::isfinite(r1engine::grad_sq_norm(views.data(), 1)));
  R1_CHECK(r1engine::grad_sq_norm(views.data(), 0) == 0.0);
}

}  // namespace

int main() {
  test_fp32(0.0, 0.9, 1.0f);
  test_fp32(0.1, 0.9, 1.0f);
  test_fp32(0.01, 0.9, 0.25f);
  test_fp32(0.0, 0.3, 1.0f);  // beta1 < 0.5: the other lerp form
  test_bf16();
  test_grad_norm();
  return r1_check_report("test_adamw");
}
