// torch.ops.r1engine.decode_step: one single-token decode step of the policy's main model on the CPU, from the
// last sampled tokens to the next-token logits, in one call.
//
// Why: at decode time a step of the small policies we roll out on CPUs does little arithmetic per operator (64 rows
// through 192x512 matrices), and the Python forward spends ~1.3 ms per step on module calls, views, dispatch and
// the KV-cache bookkeeping of ~150 operators (benchmarks/bench_decode_step.py). Here the same operators run from
// C++: the GEMMs through ATen (the very at::addmm / at::mm calls F.linear makes, so the bits are the same) and the
// element-wise parts, the cache write and the attention straight through the core kernels the operators wrap
// (csrc/core/layers.*, csrc/core/decode_attention.*).
//
// The model is r1engine.models.policy.PolicyModel (Qwen2 block: RMSNorm, GQA attention with q/k/v biases and NeoX
// RoPE, SwiGLU MLP). `weights` lists, per layer, the 12 tensors of kLayerSlots and then the final norm, lm_head
// and the embedding (r1engine/models/decode_step.py builds it). Row b reads token ids[b] at the rotary angles of
// cos[b] / sin[b], writes its key and value at cache slot lengths[b] and attends to slots 0..lengths[b]. The caller
// commits the new slot (KVCache.advance). Inference only: no autograd.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "core/decode_attention.h"
#include "core/layers.h"

namespace {

using at::Tensor;
using r1engine::FloatType;

// Order of one layer's tensors in `weights` (checkpoint names under model.layers.{i}.).
enum LayerSlot : int64_t {
  kInputNorm,      // input_layernorm.weight [H]
  kQ,              // self_attn.q_proj.weight [Hq*D, H]
  kQBias,          // self_attn.q_proj.bias [Hq*D]
  kK,              // self_attn.k_proj.weight [Hkv*D, H]
  kKBias,          // self_attn.k_proj.bias [Hkv*D]
  kV,              // self_attn.v_proj.weight [Hkv*D, H]
  kVBias,          // self_attn.v_proj.bias [Hkv*D]
  kO,              // self_attn.o_proj.weight [H, Hq*D]
  kPostNorm,       // post_attention_layernorm.weight [H]
  kGate,           // mlp.gate_proj.weight [I, H]
  kUp,             // mlp.up_proj.weight [I, H]
  kDown,           // mlp.down_proj.weight [H, I]
  kLayerSlots,
};

FloatType float_type(const Tensor& t) { return t.scalar_type() == at::kFloat ? FloatType::kF32 : FloatType::kBF16; }

// RMSNorm over the rows of x [B, H] with the fused kernel (the one r1engine.ops.rms_norm runs).
Tensor rms_norm(const Tensor& x, const Tensor& weight, float eps, Tensor& rstd) {
  const Tensor w = weight.to(at::kFloat).contiguous();
  Tensor y = at::empty_like(x);
  r1engine::rms_norm_fwd(x.data_ptr(), float_type(x), x.size(0), x.size(1), w.data_ptr<float>(), eps, y.data_ptr(),
                         rstd.data_ptr<float>());
  return y;
}

// NeoX rotary embedding of x [B, heads*D] in place of a copy, one cos/sin row per batch row.
Tensor rope(const Tensor& x, int64_t heads, int64_t dim, const Tensor& cos, const Tensor& sin) {
  Tensor y = at::empty_like(x);
  r1engine::rope_apply(x.data_ptr(), float_type(x), x.size(0), heads, dim, cos.data_ptr<float>(),
                       sin.data_ptr<float>(), /*transpose=*/false, y.data_ptr());
  return y;
}

// cache[layer] [B, Hkv, S, D] <- kv [B, Hkv*D] at slot lengths[b] of each row.
void write_cache(const Tensor& kv, Tensor& cache, int64_t layer, const int64_t* lengths) {
  const int64_t b = cache.size(1), hkv = cache.size(2), s = cache.size(3), d = cache.size(4);
  const int64_t elem = cache.element_size();
  auto* base = static_cast<char*>(cache.data_ptr()) + layer * b * hkv * s * d * elem;
  const auto* src = static_cast<const char*>(kv.data_ptr());
  for (int64_t r = 0; r < b; ++r) {
    for (int64_t h = 0; h < hkv; ++h) {
      std::memcpy(base + ((r * hkv + h) * s + lengths[r]) * d * elem, src + (r * hkv + h) * d * elem, d * elem);
    }
  }
}

void check_weights(const std::vector<Tensor>& w, int64_t layers, int64_t hidden, int64_t hq, int64_t hkv, int64_t d,
                   at::ScalarType dtype) {
  auto expect = [&](int64_t i, std::initializer_list<int64_t> shape) {
    TORCH_CHECK(w[i].sizes() == at::IntArrayRef(shape), "weights[", i, "]: expected shape ", at::IntArrayRef(shape),
                ", got ", w[i].sizes());
    TORCH_CHECK(w[i].device().is_cpu(), "weights[", i, "]: expected a CPU tensor, got device ", w[i].device());
    TORCH_CHECK(w[i].scalar_type() == dtype, "weights[", i, "]: expected dtype ", dtype, " (as the KV cache), got ",
                w[i].scalar_type());
  };
  const int64_t inter = w[kGate].size(0);
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t o = l * kLayerSlots;
    expect(o + kInputNorm, {hidden});
    expect(o + kQ, {hq * d, hidden});
    expect(o + kQBias, {hq * d});
    expect(o + kK, {hkv * d, hidden});
    expect(o + kKBias, {hkv * d});
    expect(o + kV, {hkv * d, hidden});
    expect(o + kVBias, {hkv * d});
    expect(o + kO, {hidden, hq * d});
    expect(o + kPostNorm, {hidden});
    expect(o + kGate, {inter, hidden});
    expect(o + kUp, {inter, hidden});
    expect(o + kDown, {hidden, inter});
  }
  const int64_t vocab = w[layers * kLayerSlots + 1].size(0);
  expect(layers * kLayerSlots, {hidden});
  expect(layers * kLayerSlots + 1, {vocab, hidden});
  TORCH_CHECK(w[layers * kLayerSlots + 2].dim() == 2 && w[layers * kLayerSlots + 2].size(1) == hidden,
              "weights[", layers * kLayerSlots + 2, "] (embedding): expected [vocab, ", hidden, "], got ",
              w[layers * kLayerSlots + 2].sizes());
}

Tensor decode_step_cpu(const Tensor& ids, const Tensor& cos, const Tensor& sin, Tensor& k_cache, Tensor& v_cache,
                       const Tensor& lengths, at::TensorList weights_in, int64_t num_heads, double eps) {
  TORCH_CHECK(k_cache.dim() == 5, "k_cache: expected [layers, batch, kv_heads, cache_len, head_dim], got shape ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(),
              "v_cache: expected the shape and dtype of k_cache ", k_cache.sizes(), " ", k_cache.scalar_type(),
              ", got ", v_cache.sizes(), " ", v_cache.scalar_type());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "k_cache, v_cache: expected contiguous tensors");
  TORCH_CHECK(k_cache.device().is_cpu(), "k_cache: expected a CPU tensor, got device ", k_cache.device());
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "k_cache: expected dtype float32 or bfloat16, got ",
              dtype);
  const int64_t layers = k_cache.size(0), b = k_cache.size(1), hkv = k_cache.size(2), s = k_cache.size(3),
                d = k_cache.size(4);
  TORCH_CHECK(static_cast<int64_t>(weights_in.size()) == layers * kLayerSlots + 3, "weights: expected ",
              layers * kLayerSlots + 3, " tensors (", kLayerSlots, " per layer for ", layers,
              " layers, then the final norm, lm_head and the embedding), got ", weights_in.size());
  TORCH_CHECK(num_heads >= hkv && num_heads % hkv == 0 && num_heads / hkv <= 64, "num_heads (", num_heads,
              ") must be a multiple of the cache's kv_heads (", hkv, ") with at most 64 query heads per KV head");
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == b && ids.scalar_type() == at::kLong && ids.device().is_cpu(),
              "ids: expected int64 CPU [", b, "], got ", ids.scalar_type(), " ", ids.sizes());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == b && lengths.scalar_type() == at::kLong &&
                  lengths.device().is_cpu(),
              "lengths: expected int64 CPU [", b, "], got ", lengths.scalar_type(), " ", lengths.sizes());
  for (const auto& [t, name] : {std::pair{&cos, "cos"}, std::pair{&sin, "sin"}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == b && t->size(1) == d &&
                    t->device().is_cpu(),
                name, ": expected float32 CPU [", b, ", ", d, "], got ", t->scalar_type(), " ", t->sizes());
  }
  std::vector<Tensor> w(weights_in.begin(), weights_in.end());
  const int64_t hidden = w[kInputNorm].size(0);
  check_weights(w, layers, hidden, num_heads, hkv, d, dtype);
  const Tensor len = lengths.contiguous();
  const int64_t* slot = len.data_ptr<int64_t>();
  for (int64_t r = 0; r < b; ++r) {
    TORCH_CHECK(slot[r] >= 0 && slot[r] < s, "lengths[", r, "] = ", slot[r], ": the new token's slot must lie in [0, ",
                "cache_len=", s, ") (KVCache overflow)");
  }
  const Tensor n_keys = len + 1;
  const Tensor cos_c = cos.contiguous(), sin_c = sin.contiguous();
  Tensor rstd = at::empty({b}, at::kFloat);
  const r1engine::DecodeAttentionShape shape{b, num_heads, hkv, d, s};
  const auto scale = static_cast<float>(std::pow(static_cast<double>(d), -0.5));  // as Python's d ** -0.5
  const int64_t kv_layer = b * hkv * s * d * k_cache.element_size();

  Tensor x = at::embedding(w[layers * kLayerSlots + 2], ids);
  for (int64_t l = 0; l < layers; ++l) {
    const Tensor* lw = w.data() + l * kLayerSlots;
    const Tensor h = rms_norm(x, lw[kInputNorm], static_cast<float>(eps), rstd);
    const Tensor q = rope(at::addmm(lw[kQBias], h, lw[kQ].t()), num_heads, d, cos_c, sin_c);
    const Tensor k = rope(at::addmm(lw[kKBias], h, lw[kK].t()), hkv, d, cos_c, sin_c);
    const Tensor v = at::addmm(lw[kVBias], h, lw[kV].t());
    write_cache(k, k_cache, l, slot);
    write_cache(v, v_cache, l, slot);
    Tensor attn = at::empty_like(q);
    r1engine::decode_attention(q.data_ptr(), static_cast<char*>(k_cache.data_ptr()) + l * kv_layer,
                               static_cast<char*>(v_cache.data_ptr()) + l * kv_layer, n_keys.data_ptr<int64_t>(),
                               attn.data_ptr(), shape, scale, float_type(q));
    x = x + at::mm(attn, lw[kO].t());
    const Tensor h2 = rms_norm(x, lw[kPostNorm], static_cast<float>(eps), rstd);
    const Tensor gate = at::mm(h2, lw[kGate].t()), up = at::mm(h2, lw[kUp].t());
    Tensor act = at::empty_like(gate);
    r1engine::swiglu_fwd(gate.data_ptr(), up.data_ptr(), float_type(gate), gate.numel(), act.data_ptr());
    x = x + at::mm(act, lw[kDown].t());
  }
  const Tensor hidden_out = rms_norm(x, w[layers * kLayerSlots], static_cast<float>(eps), rstd);
  return at::mm(hidden_out, w[layers * kLayerSlots + 1].t());
}

Tensor decode_step_meta(const Tensor& ids, const Tensor&, const Tensor&, Tensor&, Tensor&, const Tensor&,
                        at::TensorList weights, int64_t, double) {
  const Tensor& head = weights[weights.size() - 2];
  return at::empty({ids.size(0), head.size(0)}, head.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1engine, m) {
  m.def(
      "decode_step(Tensor ids, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor lengths, "
      "Tensor[] weights, int num_heads, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(r1engine, CPU, m) { m.impl("decode_step", &decode_step_cpu); }

TORCH_LIBRARY_IMPL(r1engine, Meta, m) { m.impl("decode_step", &decode_step_meta); }
