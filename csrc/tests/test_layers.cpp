// Unit tests of the fused RMSNorm / SwiGLU / RoPE kernels (csrc/core/layers.*) against naive double-precision loops
// of the same math, over odd sizes (8-lane vector bodies plus scalar tails, 1-row inputs, enough rows for several
// threads and several dweight blocks). bf16: on bf16 inputs each kernel must give exactly the fp32 kernel's result
// on the same (widened) values, rounded to bf16 (the arithmetic is fp32 in both). Plus: the RoPE backward is the
// transpose of the forward (<rope(x), g> == <x, rope^T(g)>), SwiGLU stays finite at |gate| = 100, NaN propagates.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "core/layers.h"
#include "tests/check.h"

using r1engine::bf16_to_float;
using r1engine::float_to_bf16;
using r1engine::FloatType;

namespace {

std::vector<uint16_t> to_bf16(std::vector<float>& x) {  // rounds x in place to bf16 values, returns the bits
  std::vector<uint16_t> b(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    b[i] = float_to_bf16(x[i]);
    x[i] = bf16_to_float(b[i]);
  }
  return b;
}

// max |a - b| / (scale + max |b|)
double max_rel(const std::vector<float>& a, const std::vector<double>& b, double scale = 1.0) {
  double err = 0.0, mag = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    err = std::max(err, std::fabs(a[i] - b[i]));
    mag = std::max(mag, std::fabs(b[i]));
  }
  return err / (scale + mag);
}

int64_t bf16_mismatches(const std::vector<uint16_t>& got, const std::vector<float>& f32) {
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) bad += got[i] != float_to_bf16(f32[i]);
  return bad;
}

// ----------------------------------------------------------------------------------------------------- RMSNorm
void test_rms_norm(int64_t rows, int64_t cols) {
  std::mt19937 rng(static_cast<unsigned>(rows * 1000 + cols));
  std::vector<float> x = r1_randn(rng, rows * cols, 2.0f), dy = r1_randn(rng, rows * cols), w = r1_randn(rng, cols);
  const float eps = 1e-6f;
  std::vector<uint16_t> xb = to_bf16(x), dyb = to_bf16(dy);  // fp32 inputs hold the same (bf16) values

  std::vector<double> y_ref(x.size()), dx_ref(x.size()), dw_ref(cols, 0.0), rstd_ref(rows);
  for (int64_t i = 0; i < rows; ++i) {
    const float* xi = x.data() + i * cols;
    const float* gi = dy.data() + i * cols;
    double ss = 0.0;
    for (int64_t j = 0; j < cols; ++j) ss += static_cast<double>(xi[j]) * xi[j];
    const double r = 1.0 / std::sqrt(ss / cols + eps);
    rstd_ref[i] = r;
    double dot = 0.0;  // sum_j dy w xhat
    for (int64_t j = 0; j < cols; ++j) {
      y_ref[i * cols + j] = xi[j] * r * w[j];
      dot += static_cast<double>(gi[j]) * w[j] * xi[j] * r;
      dw_ref[j] += static_cast<double>(gi[j]) * xi[j] * r;
    }
    for (int64_t j = 0; j < cols; ++j) dx_ref[i * cols + j] = r * (gi[j] * w[j] - xi[j] * r * dot / cols);
  }

  std::vector<float> y(x.size()), rstd(rows), dx(x.size()), dw(cols);
  r1engine::rms_norm_fwd(x.data(), FloatType::kF32, rows, cols, w.data(), eps, y.data(), rstd.data());
  r1engine::rms_norm_bwd(dy.data(), x.data(), FloatType::kF32, rows, cols, w.data(), rstd.data(), dx.data(),
                         dw.data());
  R1_CHECK_NEAR(max_rel(y, y_ref), 0.0, 2e-6);
  R1_CHECK_NEAR(max_rel(rstd, rstd_ref, 0.0), 0.0, 2e-6);
  R1_CHECK_NEAR(max_rel(dx, dx_ref), 0.0, 5e-6);
  R1_CHECK_NEAR(max_rel(dw, dw_ref), 0.0, 5e-6);

  std::vector<uint16_t> yb(x.size()), dxb(x.size());
  std::vector<float> rstdb(rows), dwb(cols);
  r1engine::rms_norm_fwd(xb.data(), FloatType::kBF16, rows, cols, w.data(), eps, yb.data(), rstdb.data());
  r1engine::rms_norm_bwd(dyb.data(), xb.data(), FloatType::kBF16, rows, cols, w.data(), rstdb.data(), dxb.data(),
                         dwb.data());
  R1_CHECK(bf16_mismatches(yb, y) == 0);
  R1_CHECK(bf16_mismatches(dxb, dx) == 0);
  R1_CHECK(rstdb == rstd);
  R1_CHECK(dwb == dw);
}

// ------------------------------------------------------------------------------------------------------ SwiGLU
void test_swiglu(int64_t n, float gate_scale) {
  std::mt19937 rng(static_cast<unsigned>(n + 17));
  std::vector<float> g = r1_randn(rng, n, gate_scale), u = r1_randn(rng, n), d = r1_randn(rng, n);
  std::vector<uint16_t> gb = to_bf16(g), ub = to_bf16(u), db = to_bf16(d);
  std::vector<double> y_ref(n), dg_ref(n), du_ref(n);
  for (int64_t i = 0; i < n; ++i) {
    const double s = 1.0 / (1.0 + std::exp(-static_cast<double>(g[i])));
    y_ref[i] = g[i] * s * u[i];
    dg_ref[i] = static_cast<double>(d[i]) * u[i] * s * (1.0 + g[i] * (1.0 - s));
    du_ref[i] = static_cast<double>(d[i]) * g[i] * s;
  }
  std::vector<float> y(n), dg(n), du(n);
  r1engine::swiglu_fwd(g.data(), u.data(), FloatType::kF32, n, y.data());
  r1engine::swiglu_bwd(d.data(), g.data(), u.data(), FloatType::kF32, n, dg.data(), du.data());
  // element-wise relative error (plus a small absolute floor)
  double err = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    err = std::max(err, std::fabs(y[i] - y_ref[i]) / (1e-6 + std::fabs(y_ref[i])));
    err = std::max(err, std::fabs(dg[i] - dg_ref[i]) / (1e-6 + std::fabs(dg_ref[i])));
    err = std::max(err, std::fabs(du[i] - du_ref[i]) / (1e-6 + std::fabs(du_ref[i])));
    R1_CHECK(std::isfinite(y[i]) && std::isfinite(dg[i]) && std::isfinite(du[i]));
  }
  R1_CHECK_NEAR(err, 0.0, 2e-5);

  std::vector<uint16_t> yb(n), dgb(n), dub(n);
  r1engine::swiglu_fwd(gb.data(), ub.data(), FloatType::kBF16, n, yb.data());
  r1engine::swiglu_bwd(db.data(), gb.data(), ub.data(), FloatType::kBF16, n, dgb.data(), dub.data());
  R1_CHECK(bf16_mismatches(yb, y) == 0);
  R1_CHECK(bf16_mismatches(dgb, dg) == 0);
  R1_CHECK(bf16_mismatches(dub, du) == 0);
}

void test_swiglu_special() {
  // Saturated gates (vector body and scalar tail) and NaN.
  std::vector<float> g = {100.f, -100.f, 30.f, -30.f, 0.f, -0.f, 88.f, -90.f, 100.f, -100.f, NAN};
  const int64_t n = static_cast<int64_t>(g.size());
  std::vector<float> u(n, 2.0f), d(n, 1.0f), y(n), dg(n), du(n);
  r1engine::swiglu_fwd(g.data(), u.data(), FloatType::kF32, n, y.data());
  r1engine::swiglu_bwd(d.data(), g.data(), u.data(), FloatType::kF32, n, dg.data(), du.data());
  for (int64_t i = 0; i + 1 < n; ++i) {
    const double s = 1.0 / (1.0 + std::exp(-static_cast<double>(g[i])));
    R1_CHECK_NEAR(y[i], g[i] * s * 2.0, 1e-6);
    R1_CHECK_NEAR(dg[i], 2.0 * s * (1.0 + g[i] * (1.0 - s)), 1e-6);
  }
  R1_CHECK(std::isnan(y[n - 1]) && std::isnan(dg[n - 1]) && std::isnan(du[n - 1]));
  std::vector<uint16_t> gb = to_bf16(g), ub = to_bf16(u), yb(n);
  r1engine::swiglu_fwd(gb.data(), ub.data(), FloatType::kBF16, n, yb.data());
  R1_CHECK(std::isnan(bf16_to_float(yb[n - 1])));
}

// -------------------------------------------------------------------------------------------------------- RoPE
void test_rope(int64_t rows, int64_t heads, int64_t dim) {
  std::mt19937 rng(static_cast<unsigned>(rows * 100 + heads * 10 + dim));
  const int64_t n = rows * heads * dim, half = dim / 2;
  std::vector<float> x = r1_randn(rng, n), g = r1_randn(rng, n), ang = r1_randn(rng, rows * dim, 3.0f);
  std::vector<float> cos(ang.size()), sin(ang.size());
  for (size_t i = 0; i < ang.size(); ++i) {  // independent halves: the kernel must not assume sin_lo == sin_hi
    cos[i] = std::cos(ang[i]);
    sin[i] = std::sin(ang[i] * 1.3f);
  }
  std::vector<uint16_t> xb = to_bf16(x), gb = to_bf16(g);
  std::vector<double> y_ref(n), dx_ref(n);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t o = (r * heads + h) * dim;
      const float* c = cos.data() + r * dim;
      const float* s = sin.data() + r * dim;
      for (int64_t j = 0; j < dim; ++j) {
        const double rot = j < half ? -x[o + j + half] : x[o + j - half];
        y_ref[o + j] = static_cast<double>(x[o + j]) * c[j] + rot * s[j];
        // transpose of rotate_half: cat(y[half:], -y[:half]) with y = g * sin
        const double rt = j < half ? static_cast<double>(g[o + j + half]) * s[j + half]
                                   : -static_cast<double>(g[o + j - half]) * s[j - half];
        dx_ref[o + j] = static_cast<double>(g[o + j]) * c[j] + rt;
      }
    }
  std::vector<float> y(n), dx(n);
  r1engine::rope_apply(x.data(), FloatType::kF32, rows, heads, dim, cos.data(), sin.data(), false, y.data());
  r1engine::rope_apply(g.data(), FloatType::kF32, rows, heads, dim, cos.data(), sin.data(), true, dx.data());
  R1_CHECK_NEAR(max_rel(y, y_ref), 0.0, 1e-6);
  R1_CHECK_NEAR(max_rel(dx, dx_ref), 0.0, 1e-6);
  // The backward is the adjoint of the forward.
  double lhs = 0.0, rhs = 0.0, mag = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    lhs += static_cast<double>(y[i]) * g[i];
    rhs += static_cast<double>(x[i]) * dx[i];
    mag += std::fabs(static_cast<double>(x[i]) * dx[i]);
  }
  R1_CHECK_NEAR(lhs / (1.0 + mag), rhs / (1.0 + mag), 1e-6);

  std::vector<uint16_t> yb(n), dxb(n);
  r1engine::rope_apply(xb.data(), FloatType::kBF16, rows, heads, dim, cos.data(), sin.data(), false, yb.data());
  r1engine::rope_apply(gb.data(), FloatType::kBF16, rows, heads, dim, cos.data(), sin.data(), true, dxb.data());
  R1_CHECK(bf16_mismatches(yb, y) == 0);
  R1_CHECK(bf16_mismatches(dxb, dx) == 0);
}

}  // namespace

int main() {
  for (int64_t cols : {1, 7, 8, 33, 191, 899})
    for (int64_t rows : {1, 5, 300}) test_rms_norm(rows, cols);
  test_rms_norm(2, 4096 + 5);  // long rows: fp32 accumulation over many lanes
  for (int64_t n : {1, 7, 8, 33, 191, 8192 * 5 + 3}) test_swiglu(n, 2.0f);
  test_swiglu(1000, 20.0f);  // mostly saturated sigmoids
  test_swiglu_special();
  for (int64_t dim : {2, 6, 16, 32, 34, 128})
    for (int64_t rows : {1, 9, 400}) test_rope(rows, 3, dim);
  test_rope(7, 1, 64);
  return r1_check_report("test_layers");
}
