// torch.ops.r1engine.decode_attention: single-query attention over a ragged KV cache (csrc/core/decode_attention.*),
// the decode step of the native rollout engine. Inference only: no autograd formula (generation runs under
// no_grad); a Meta kernel gives shapes to tracing.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "core/decode_attention.h"

namespace {

using at::Tensor;

Tensor decode_attention_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& n_keys, double scale) {
  TORCH_CHECK(q.dim() == 3, "q: expected [batch, q_heads, head_dim], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "k: expected [batch, kv_heads, cache_len, head_dim], got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v: expected the shape of k ", k.sizes(), ", got ", v.sizes());
  const int64_t b = q.size(0), hq = q.size(1), d = q.size(2), hkv = k.size(1), s = k.size(2);
  TORCH_CHECK(k.size(0) == b && k.size(3) == d, "k: expected [", b, ", kv_heads, cache_len, ", d,
              "] to match q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(hkv >= 1 && hq % hkv == 0 && hq / hkv <= 64, "q_heads (", hq, ") must be a multiple of kv_heads (", hkv,
              ") with at most 64 query heads per KV head");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v: expected one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "q: expected dtype float32 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(n_keys.dim() == 1 && n_keys.size(0) == b && n_keys.scalar_type() == at::kLong,
              "n_keys: expected int64 [", b, "], got ", n_keys.scalar_type(), " ", n_keys.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && n_keys.device().is_cpu(),
              "decode_attention: expected CPU tensors, got q on ", q.device());
  const Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), nc = n_keys.contiguous();
  if (b > 0) {
    const int64_t most = nc.max().item<int64_t>();
    TORCH_CHECK(most <= s, "n_keys: expected values <= cache_len=", s, ", got ", most);
  }
  Tensor out = at::empty_like(qc);
  const r1engine::DecodeAttentionShape shape{b, hq, hkv, d, s};
  const auto dtype = q.scalar_type() == at::kFloat ? r1engine::FloatType::kF32 : r1engine::FloatType::kBF16;
  r1engine::decode_attention(qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), nc.data_ptr<int64_t>(), out.data_ptr(),
                             shape, static_cast<float>(scale), dtype);
  return out;
}

Tensor decode_attention_meta(const Tensor& q, const Tensor&, const Tensor&, const Tensor&, double) {
  return at::empty_like(q);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1engine, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor n_keys, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(r1engine, CPU, m) {
  m.impl("decode_attention", &decode_attention_cpu);
}

TORCH_LIBRARY_IMPL(r1engine, Meta, m) {
  m.impl("decode_attention", &decode_attention_meta);
}
