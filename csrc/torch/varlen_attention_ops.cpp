// torch.ops.r1engine.varlen_attention_fwd / varlen_attention_bwd: attention of packed variable-length sequences
// (csrc/core/varlen_attention.*), the CPU backend "cpu" of r1engine.packing.attention.varlen_attention. The
// autograd formula lives in Python (r1engine/ops/varlen_attention.py); Meta kernels give shapes to tracing.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <tuple>

#include "core/varlen_attention.h"

namespace {

using at::Tensor;

// Checks q, k, v and cu_seqlens; returns the shape. cu_seqlens must rise from 0 to total (read on the host).
r1engine::VarlenAttentionShape check_inputs(const Tensor& q, const Tensor& k, const Tensor& v,
                                            const Tensor& cu_seqlens) {
  TORCH_CHECK(q.dim() == 3, "q: expected [total, q_heads, head_dim], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 3, "k: expected [total, kv_heads, head_dim], got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v: expected the shape of k ", k.sizes(), ", got ", v.sizes());
  const int64_t total = q.size(0), hq = q.size(1), d = q.size(2), hkv = k.size(1);
  TORCH_CHECK(k.size(0) == total && k.size(2) == d, "k: expected [", total, ", kv_heads, ", d, "] to match q ",
              q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(hkv >= 1 && hq % hkv == 0, "q_heads (", hq, ") must be a multiple of kv_heads (", hkv, ")");
  TORCH_CHECK(d >= 1, "q: expected head_dim >= 1, got shape ", q.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v: expected one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "q: expected dtype float32 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1 && cu_seqlens.scalar_type() == at::kInt,
              "cu_seqlens: expected int32 [num_seqs + 1], got ", cu_seqlens.scalar_type(), " ", cu_seqlens.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && cu_seqlens.device().is_cpu(),
              "varlen_attention: expected CPU tensors, got q on ", q.device(), ", cu_seqlens on ",
              cu_seqlens.device());
  const Tensor cu = cu_seqlens.contiguous();
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t seqs = cu.size(0) - 1;
  // ValueError in Python, as r1engine.packing.attention's own check of cu_seqlens
  TORCH_CHECK_VALUE(c[0] == 0 && c[seqs] == total, "cu_seqlens: expected to rise from 0 to total=", total, ", got ", c[0],
              " ... ", c[seqs]);
  for (int64_t b = 0; b < seqs; ++b) {
    TORCH_CHECK_VALUE(c[b + 1] >= c[b], "cu_seqlens: expected non-decreasing values, got ", c[b], " then ", c[b + 1],
                " at index ", b);
  }
  return r1engine::VarlenAttentionShape{total, seqs, hq, hkv, d};
}

r1engine::FloatType dtype_of(const Tensor& t) {
  return t.scalar_type() == at::kFloat ? r1engine::FloatType::kF32 : r1engine::FloatType::kBF16;
}

std::tuple<Tensor, Tensor> varlen_attention_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                    const Tensor& cu_seqlens, double scale, bool causal) {
  const auto shape = check_inputs(q, k, v, cu_seqlens);
  const Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), cu = cu_seqlens.contiguous();
  Tensor out = at::empty_like(qc);
  Tensor lse = at::empty({shape.total, shape.q_heads}, q.options().dtype(at::kFloat));
  r1engine::varlen_attention_fwd(qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), cu.data_ptr<int32_t>(), out.data_ptr(),
                                 lse.data_ptr<float>(), shape, static_cast<float>(scale), causal, dtype_of(q));
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> varlen_attention_bwd_cpu(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                            const Tensor& v, const Tensor& out, const Tensor& lse,
                                                            const Tensor& cu_seqlens, double scale, bool causal) {
  const auto shape = check_inputs(q, k, v, cu_seqlens);
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type() && dout.device().is_cpu(),
              "dout: expected ", q.scalar_type(), " ", q.sizes(), " on CPU (as q), got ", dout.scalar_type(), " ",
              dout.sizes(), " on ", dout.device());
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.device().is_cpu(),
              "out: expected ", q.scalar_type(), " ", q.sizes(), " on CPU (as q), got ", out.scalar_type(), " ",
              out.sizes(), " on ", out.device());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == shape.total && lse.size(1) == shape.q_heads &&
                  lse.scalar_type() == at::kFloat && lse.device().is_cpu(),
              "lse: expected float32 [", shape.total, ", ", shape.q_heads, "] on CPU, got ", lse.scalar_type(), " ",
              lse.sizes(), " on ", lse.device());
  const Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), cu = cu_seqlens.contiguous();
  const Tensor dc = dout.contiguous(), oc = out.contiguous(), lc = lse.contiguous();
  Tensor dq = at::empty_like(qc), dk = at::empty_like(kc), dv = at::empty_like(vc);
  r1engine::varlen_attention_bwd(dc.data_ptr(), qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), oc.data_ptr(),
                                 lc.data_ptr<float>(), cu.data_ptr<int32_t>(), dq.data_ptr(), dk.data_ptr(),
                                 dv.data_ptr(), shape, static_cast<float>(scale), causal, dtype_of(q));
  return {dq, dk, dv};
}

std::tuple<Tensor, Tensor> varlen_attention_fwd_meta(const Tensor& q, const Tensor&, const Tensor&, const Tensor&,
                                                     double, bool) {
  return {at::empty_like(q), at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat))};
}

std::tuple<Tensor, Tensor, Tensor> varlen_attention_bwd_meta(const Tensor&, const Tensor& q, const Tensor& k,
                                                             const Tensor& v, const Tensor&, const Tensor&,
                                                             const Tensor&, double, bool) {
  return {at::empty_like(q), at::empty_like(k), at::empty_like(v)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1engine, m) {
  m.def(
      "varlen_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, float scale, bool causal) -> "
      "(Tensor, Tensor)");
  m.def(
      "varlen_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens, "
      "float scale, bool causal) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(r1engine, CPU, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cpu);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cpu);
}

TORCH_LIBRARY_IMPL(r1engine, Meta, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_meta);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_meta);
}
