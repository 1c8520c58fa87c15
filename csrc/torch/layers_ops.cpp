// torch.ops.r1engine.{rms_norm,swiglu,rope}_{fwd,bwd}: the fused decoder-layer kernels of csrc/core/layers.* on
// CPU tensors. These are the raw kernels (no autograd); the differentiable operators with their backward formulas
// and the PyTorch references are r1engine/ops/{rms_norm,swiglu,rope}.py, which flatten and make inputs contiguous
// before calling here.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <tuple>

#include "core/layers.h"

namespace {

using at::Tensor;
using r1engine::FloatType;

FloatType check_act(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              ": expected dtype float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got shape ", t.sizes(), " with strides ",
              t.strides());
  return t.scalar_type() == at::kFloat ? FloatType::kF32 : FloatType::kBF16;
}

void check_same(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  check_act(t, name);
  TORCH_CHECK(t.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " (as ", ref_name, "), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (as ", ref_name,
              "), got ", t.scalar_type());
}

void check_f32(const Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected dtype float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

// cos / sin of RoPE: contiguous fp32, one row of D per row of x: [rows, D] or any shape [..., D] of rows * D elements
// (e.g. [B, T, D] for x [B, T, H, D]).
void check_table(const Tensor& t, const char* name, int64_t rows, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected dtype float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == dim && t.numel() == rows * dim, name, ": expected shape [rows, D] = [",
              rows, ", ", dim, "] (one row per row of x), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

// x [..., H] -> (rows, H)
std::tuple<int64_t, int64_t> rows_cols(const Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "x: expected at least 1 dimension [..., H], got a scalar");
  const int64_t cols = x.size(-1);
  TORCH_CHECK(cols > 0, "x: expected a non-empty last dimension, got shape ", x.sizes());
  return {x.numel() / cols, cols};
}

std::tuple<Tensor, Tensor> rms_norm_fwd_cpu(const Tensor& x, const Tensor& weight, double eps) {
  const FloatType dt = check_act(x, "x");
  const auto [rows, cols] = rows_cols(x);
  check_f32(weight, "weight", {cols});
  TORCH_CHECK(eps >= 0.0, "eps: expected a value >= 0, got ", eps);
  Tensor y = at::empty(x.sizes(), x.options());
  Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  r1engine::rms_norm_fwd(x.data_ptr(), dt, rows, cols, weight.data_ptr<float>(), static_cast<float>(eps),
                         y.data_ptr(), rstd.data_ptr<float>());
  return {y, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_bwd_cpu(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                            const Tensor& rstd) {
  const FloatType dt = check_act(x, "x");
  check_same(dy, "dy", x, "x");
  const auto [rows, cols] = rows_cols(x);
  check_f32(weight, "weight", {cols});
  check_f32(rstd, "rstd", x.sizes().slice(0, x.dim() - 1));
  Tensor dx = at::empty(x.sizes(), x.options());
  Tensor dweight = at::empty({cols}, x.options().dtype(at::kFloat));
  r1engine::rms_norm_bwd(dy.data_ptr(), x.data_ptr(), dt, rows, cols, weight.data_ptr<float>(),
                         rstd.data_ptr<float>(), dx.data_ptr(), dweight.data_ptr<float>());
  return {dx, dweight};
}

Tensor swiglu_fwd_cpu(const Tensor& gate, const Tensor& up) {
  const FloatType dt = check_act(gate, "gate");
  check_same(up, "up", gate, "gate");
  Tensor y = at::empty(gate.sizes(), gate.options());
  r1engine::swiglu_fwd(gate.data_ptr(), up.data_ptr(), dt, gate.numel(), y.data_ptr());
  return y;
}

std::tuple<Tensor, Tensor> swiglu_bwd_cpu(const Tensor& dy, const Tensor& gate, const Tensor& up) {
  const FloatType dt = check_act(gate, "gate");
  check_same(up, "up", gate, "gate");
  check_same(dy, "dy", gate, "gate");
  Tensor dgate = at::empty(gate.sizes(), gate.options()), dup = at::empty(gate.sizes(), gate.options());
  r1engine::swiglu_bwd(dy.data_ptr(), gate.data_ptr(), up.data_ptr(), dt, gate.numel(), dgate.data_ptr(),
                       dup.data_ptr());
  return {dgate, dup};
}

Tensor rope_cpu(const Tensor& x, const Tensor& cos, const Tensor& sin, bool transpose, const char* x_name) {
  const FloatType dt = check_act(x, x_name);
  TORCH_CHECK(x.dim() >= 2, x_name, ": expected shape [..., H, D], got ", x.sizes());
  const int64_t heads = x.size(-2), dim = x.size(-1);
  int64_t rows = 1;
  for (int64_t i = 0; i < x.dim() - 2; ++i) rows *= x.size(i);
  TORCH_CHECK(dim % 2 == 0, x_name, ": expected an even head dim D (NeoX rotate_half), got D = ", dim, " in shape ",
              x.sizes());
  check_table(cos, "cos", rows, dim);
  check_table(sin, "sin", rows, dim);
  Tensor y = at::empty(x.sizes(), x.options());
  r1engine::rope_apply(x.data_ptr(), dt, rows, heads, dim, cos.data_ptr<float>(), sin.data_ptr<float>(), transpose,
                       y.data_ptr());
  return y;
}

Tensor rope_fwd_cpu(const Tensor& x, const Tensor& cos, const Tensor& sin) { return rope_cpu(x, cos, sin, false, "x"); }

Tensor rope_bwd_cpu(const Tensor& dy, const Tensor& cos, const Tensor& sin) {
  return rope_cpu(dy, cos, sin, true, "dy");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1engine, m) {
  // x [..., H] (fp32/bf16, contiguous), weight [H] fp32 -> y (x's dtype), rstd [...] fp32
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  // -> dx (x's dtype), dweight [H] fp32
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
  // -> dgate, dup
  m.def("swiglu_bwd(Tensor dy, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  // x [..., H, D] (rows = prod of the leading dims), cos/sin [rows, D] (or [..., D] with x's leading dims) fp32
  m.def("rope_fwd(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  // the transpose of rope_fwd applied to dy [..., H, D]
  m.def("rope_bwd(Tensor dy, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(r1engine, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
  m.impl("swiglu_fwd", &swiglu_fwd_cpu);
  m.impl("swiglu_bwd", &swiglu_bwd_cpu);
  m.impl("rope_fwd", &rope_fwd_cpu);
  m.impl("rope_bwd", &rope_bwd_cpu);
}
