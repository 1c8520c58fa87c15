// torch.ops.r1engine.decode_step: one single-token decode step of the policy's main model on the CPU, from the
// last sampled tokens to the next-token logits, in one call. torch.ops.r1engine.decode_layers: the decoder layers
// alone over T new tokens per row (hidden states in and out), for speculative verify steps and the MTP layer.
//
// Why: at decode time a step of the small policies we roll out on CPUs does little arithmetic per operator, and the
// Python forward spends a large share of each step on module calls, views, dispatch and the KV-cache bookkeeping of
// ~150 operators (benchmarks/bench_decode_step.py). Here the same operators run from C++: the GEMMs through ATen (the
// very at::addmm / at::mm calls F.linear makes with and without a bias, so the bits are the same) and the element-
// wise parts, the cache write and the attention straight through the core kernels the operators wrap
// (csrc/core/layers.*, csrc/core/decode_attention.*).
//
// The model is r1engine.models.policy.PolicyModel: RMSNorm, GQA attention with NeoX RoPE, SwiGLU MLP, in every
// family it loads. The families differ only in optional pieces of the attention, so one fixed slot layout
// (kLayerSlots tensors per layer, LayerSlot below) serves them all and an absent piece is an empty tensor:
//   Qwen2 / MiMo: q/k/v biases;  Llama: no bias, or q/k/v and o biases (attention_bias);
//   Qwen3: biases as Llama, plus per-head RMSNorm of q and k (q_norm, k_norm over head_dim) before RoPE.
// The head width D is the cache's (Llama and Qwen3 may set head_dim != hidden / heads). `weights` lists, per layer,
// the kLayerSlots tensors and then the final norm, lm_head and the embedding (r1engine/models/decode_step.py builds
// it). Row b reads token ids[b] at the rotary angles of cos[b] / sin[b] (scaled RoPE tables come precomputed from
// Python), writes its key and value at cache slot lengths[b] and attends to slots 0..lengths[b]. The caller commits
// the new slot (KVCache.advance). decode_layers takes x [B, T, H] and cos/sin [B, T, D] and the layer slots only;
// token t of row b goes to slot lengths[b]+t, and the attention kernel, which takes one query per row, runs once per
// t. Inference only: no autograd.
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

// Order of one layer's tensors in `weights` (checkpoint names under model.layers.{i}.). (optional): an empty tensor
// (numel 0) where the family has no such piece.
enum LayerSlot : int64_t {
  kInputNorm,      // input_layernorm.weight [H]
  kQ,              // self_attn.q_proj.weight [Hq*D, H]
  kQBias,          // self_attn.q_proj.bias [Hq*D] (optional)
  kK,              // self_attn.k_proj.weight [Hkv*D, H]
  kKBias,          // self_attn.k_proj.bias [Hkv*D] (optional)
  kV,              // self_attn.v_proj.weight [Hkv*D, H]
  kVBias,          // self_attn.v_proj.bias [Hkv*D] (optional)
  kQNorm,          // self_attn.q_norm.weight [D] (optional, Qwen3)
  kKNorm,          // self_attn.k_norm.weight [D] (optional, Qwen3)
  kO,              // self_attn.o_proj.weight [H, Hq*D]
  kOBias,          // self_attn.o_proj.bias [H] (optional)
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

// Per-head RMSNorm of x [B, heads*D] over each head's D values (Qwen3's q_norm / k_norm): the kernel's rows are the
// B*heads heads, as r1engine.ops.rms_norm's rows are for the eager path's contiguous [b, t, heads, D] tensors.
Tensor head_rms_norm(const Tensor& x, const Tensor& weight, int64_t dim, float eps) {
  const int64_t rows = x.numel() / dim;
  Tensor rstd = at::empty({rows}, at::kFloat);
  return rms_norm(x.view({rows, dim}), weight, eps, rstd).view(x.sizes());
}

// x @ weight^T (+ bias): F.linear's own calls, at::addmm with a bias and at::mm without (an empty `bias`).
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  return bias.numel() ? at::addmm(bias, x, weight.t()) : at::mm(x, weight.t());
}

// NeoX rotary embedding of x [B, heads*D] in place of a copy, one cos/sin row per batch row.
Tensor rope(const Tensor& x, int64_t heads, int64_t dim, const Tensor& cos, const Tensor& sin) {
  Tensor y = at::empty_like(x);
  r1engine::rope_apply(x.data_ptr(), float_type(x), x.size(0), heads, dim, cos.data_ptr<float>(),
                       sin.data_ptr<float>(), /*transpose=*/false, y.data_ptr());
  return y;
}

// cache[layer] [B, Hkv, S, D] <- kv [B*T, Hkv*D]: token t of row b at slot[b*T+t].
void write_cache(const Tensor& kv, Tensor& cache, int64_t layer, const int64_t* slot, int64_t tokens) {
  const int64_t b = cache.size(1), hkv = cache.size(2), s = cache.size(3), d = cache.size(4);
  const int64_t elem = cache.element_size();
  auto* base = static_cast<char*>(cache.data_ptr()) + layer * b * hkv * s * d * elem;
  const auto* src = static_cast<const char*>(kv.data_ptr());
  for (int64_t row = 0; row < b * tokens; ++row) {
    const int64_t r = row / tokens;
    for (int64_t h = 0; h < hkv; ++h) {
      std::memcpy(base + ((r * hkv + h) * s + slot[row]) * d * elem, src + (row * hkv + h) * d * elem, d * elem);
    }
  }
}

void expect_weight(const std::vector<Tensor>& w, int64_t i, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(w[i].sizes() == shape, "weights[", i, "]: expected shape ", shape, ", got ", w[i].sizes());
  TORCH_CHECK(w[i].device().is_cpu(), "weights[", i, "]: expected a CPU tensor, got device ", w[i].device());
  TORCH_CHECK(w[i].scalar_type() == dtype, "weights[", i, "]: expected dtype ", dtype, " (as the KV cache), got ",
              w[i].scalar_type());
}

// An optional slot: an empty tensor (the piece is absent) or a present one as expect_weight checks it.
void expect_optional(const std::vector<Tensor>& w, int64_t i, at::IntArrayRef shape, at::ScalarType dtype) {
  if (w[i].numel() == 0) return;
  TORCH_CHECK(w[i].sizes() == shape, "weights[", i, "]: expected shape ", shape,
              " or an empty tensor (absent), got ", w[i].sizes());
  expect_weight(w, i, shape, dtype);
}

// The first layers * kLayerSlots tensors of w: one decoder layer after another, in LayerSlot order.
void check_layer_weights(const std::vector<Tensor>& w, int64_t layers, int64_t hidden, int64_t hq, int64_t hkv,
                         int64_t d, at::ScalarType dtype) {
  const int64_t inter = w[kGate].size(0);
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t o = l * kLayerSlots;
    expect_weight(w, o + kInputNorm, {hidden}, dtype);
    expect_weight(w, o + kQ, {hq * d, hidden}, dtype);
    expect_optional(w, o + kQBias, {hq * d}, dtype);
    expect_weight(w, o + kK, {hkv * d, hidden}, dtype);
    expect_optional(w, o + kKBias, {hkv * d}, dtype);
    expect_weight(w, o + kV, {hkv * d, hidden}, dtype);
    expect_optional(w, o + kVBias, {hkv * d}, dtype);
    expect_optional(w, o + kQNorm, {d}, dtype);
    expect_optional(w, o + kKNorm, {d}, dtype);
    expect_weight(w, o + kO, {hidden, hq * d}, dtype);
    expect_optional(w, o + kOBias, {hidden}, dtype);
    expect_weight(w, o + kPostNorm, {hidden}, dtype);
    expect_weight(w, o + kGate, {inter, hidden}, dtype);
    expect_weight(w, o + kUp, {inter, hidden}, dtype);
    expect_weight(w, o + kDown, {hidden, inter}, dtype);
  }
}

// The layers, then the final norm [H], lm_head [V, H] and the embedding [vocab, H].
void check_weights(const std::vector<Tensor>& w, int64_t layers, int64_t hidden, int64_t hq, int64_t hkv, int64_t d,
                   at::ScalarType dtype) {
  check_layer_weights(w, layers, hidden, hq, hkv, d, dtype);
  const int64_t tail = layers * kLayerSlots;
  expect_weight(w, tail, {hidden}, dtype);
  expect_weight(w, tail + 1, {w[tail + 1].size(0), hidden}, dtype);
  TORCH_CHECK(w[tail + 2].dim() == 2 && w[tail + 2].size(1) == hidden, "weights[", tail + 2,
              "] (embedding): expected [vocab, ", hidden, "], got ", w[tail + 2].sizes());
}

// Checks of the cache and the per-row tensors shared by both operators; returns the cache's dims.
struct CacheDims {
  int64_t layers, batch, kv_heads, cache_len, head_dim;
};

CacheDims check_cache(const Tensor& k_cache, const Tensor& v_cache, const Tensor& lengths, int64_t num_heads) {
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
  const CacheDims c{k_cache.size(0), k_cache.size(1), k_cache.size(2), k_cache.size(3), k_cache.size(4)};
  TORCH_CHECK(num_heads >= c.kv_heads && num_heads % c.kv_heads == 0 && num_heads / c.kv_heads <= 64, "num_heads (",
              num_heads, ") must be a multiple of the cache's kv_heads (", c.kv_heads,
              ") with at most 64 query heads per KV head");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == c.batch && lengths.scalar_type() == at::kLong &&
                  lengths.device().is_cpu(),
              "lengths: expected int64 CPU [", c.batch, "], got ", lengths.scalar_type(), " ", lengths.sizes());
  return c;
}

// cos / sin: float32 CPU with one row of head_dim per new token ([B, D] for one token per row, [B, T, D] for T).
void check_rotary(const Tensor& t, const char* name, int64_t tokens, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() >= 2 && t.size(-1) == dim && t.numel() == tokens * dim &&
                  t.device().is_cpu(),
              name, ": expected float32 CPU with ", tokens, " rows of ", dim, " (one per new token), got ",
              t.scalar_type(), " ", t.sizes());
}

// The decoder layers over T new tokens per row: x [B*T, H] (rows b-major) -> [B*T, H]. Token t of row b rotates by
// row b*T+t of cos/sin, writes its key and value at cache slot lengths[b]+t and attends to slots 0..lengths[b]+t.
Tensor run_layers(Tensor x, int64_t tokens, const Tensor& cos, const Tensor& sin, Tensor& k_cache, Tensor& v_cache,
                  const Tensor& lengths, const std::vector<Tensor>& w, int64_t num_heads, float eps) {
  const CacheDims c{k_cache.size(0), k_cache.size(1), k_cache.size(2), k_cache.size(3), k_cache.size(4)};
  const int64_t b = c.batch, d = c.head_dim, rows = b * tokens;
  const Tensor len = lengths.contiguous();
  const int64_t* first = len.data_ptr<int64_t>();
  std::vector<int64_t> slot(static_cast<size_t>(rows));
  for (int64_t r = 0; r < b; ++r) {
    TORCH_CHECK(first[r] >= 0 && first[r] + tokens <= c.cache_len, "lengths[", r, "] = ", first[r], ": the ", tokens,
                " new token(s) must fit in slots [0, cache_len=", c.cache_len, ") (KVCache overflow)");
    for (int64_t t = 0; t < tokens; ++t) slot[r * tokens + t] = first[r] + t;
  }
  const Tensor cos_c = cos.contiguous(), sin_c = sin.contiguous();
  Tensor rstd = at::empty({rows}, at::kFloat);
  const r1engine::DecodeAttentionShape shape{b, num_heads, c.kv_heads, d, c.cache_len};
  const auto scale = static_cast<float>(std::pow(static_cast<double>(d), -0.5));  // as Python's d ** -0.5
  const int64_t kv_layer = b * c.kv_heads * c.cache_len * d * k_cache.element_size();
  // one query per row and call of the attention kernel: token t of every row at a time (n_keys = lengths + t + 1)
  std::vector<int64_t> n_keys(static_cast<size_t>(b));
  const Tensor rows_of_token = at::arange(b, at::kLong) * tokens;

  for (int64_t l = 0; l < c.layers; ++l) {
    const Tensor* lw = w.data() + l * kLayerSlots;
    const Tensor h = rms_norm(x, lw[kInputNorm], eps, rstd);
    Tensor q = linear(h, lw[kQ], lw[kQBias]);
    Tensor k = linear(h, lw[kK], lw[kKBias]);
    if (lw[kQNorm].numel()) q = head_rms_norm(q, lw[kQNorm], d, eps);  // Qwen3: before RoPE, as the eager path
    if (lw[kKNorm].numel()) k = head_rms_norm(k, lw[kKNorm], d, eps);
    q = rope(q, num_heads, d, cos_c, sin_c);
    k = rope(k, c.kv_heads, d, cos_c, sin_c);
    const Tensor v = linear(h, lw[kV], lw[kVBias]);
    write_cache(k, k_cache, l, slot.data(), tokens);
    write_cache(v, v_cache, l, slot.data(), tokens);
    const auto* k_layer = static_cast<const char*>(k_cache.data_ptr()) + l * kv_layer;
    const auto* v_layer = static_cast<const char*>(v_cache.data_ptr()) + l * kv_layer;
    Tensor attn = at::empty_like(q);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t r = 0; r < b; ++r) n_keys[r] = first[r] + t + 1;
      const bool one = tokens == 1;
      const Tensor qt = one ? q : q.index_select(0, rows_of_token + t);
      Tensor out = one ? attn : at::empty_like(qt);
      r1engine::decode_attention(qt.data_ptr(), k_layer, v_layer, n_keys.data(), out.data_ptr(), shape, scale,
                                 float_type(q));
      if (!one) attn.index_copy_(0, rows_of_token + t, out);
    }
    x = x + linear(attn, lw[kO], lw[kOBias]);
    const Tensor h2 = rms_norm(x, lw[kPostNorm], eps, rstd);
    const Tensor gate = at::mm(h2, lw[kGate].t()), up = at::mm(h2, lw[kUp].t());
    Tensor act = at::empty_like(gate);
    r1engine::swiglu_fwd(gate.data_ptr(), up.data_ptr(), float_type(gate), gate.numel(), act.data_ptr());
    x = x + at::mm(act, lw[kDown].t());
  }
  return x;
}

Tensor decode_step_cpu(const Tensor& ids, const Tensor& cos, const Tensor& sin, Tensor& k_cache, Tensor& v_cache,
                       const Tensor& lengths, at::TensorList weights_in, int64_t num_heads, double eps) {
  const CacheDims c = check_cache(k_cache, v_cache, lengths, num_heads);
  TORCH_CHECK(static_cast<int64_t>(weights_in.size()) == c.layers * kLayerSlots + 3, "weights: expected ",
              c.layers * kLayerSlots + 3, " tensors (", kLayerSlots, " per layer for ", c.layers,
              " layers, then the final norm, lm_head and the embedding), got ", weights_in.size());
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == c.batch && ids.scalar_type() == at::kLong && ids.device().is_cpu(),
              "ids: expected int64 CPU [", c.batch, "], got ", ids.scalar_type(), " ", ids.sizes());
  check_rotary(cos, "cos", c.batch, c.head_dim);
  check_rotary(sin, "sin", c.batch, c.head_dim);
  std::vector<Tensor> w(weights_in.begin(), weights_in.end());
  const int64_t hidden = w[kInputNorm].size(0);
  check_weights(w, c.layers, hidden, num_heads, c.kv_heads, c.head_dim, k_cache.scalar_type());
  const int64_t tail = c.layers * kLayerSlots;
  Tensor x = at::embedding(w[tail + 2], ids);
  x = run_layers(x, 1, cos, sin, k_cache, v_cache, lengths, w, num_heads, static_cast<float>(eps));
  Tensor rstd = at::empty({c.batch}, at::kFloat);
  const Tensor hidden_out = rms_norm(x, w[tail], static_cast<float>(eps), rstd);
  return at::mm(hidden_out, w[tail + 1].t());
}

Tensor decode_layers_cpu(const Tensor& x, const Tensor& cos, const Tensor& sin, Tensor& k_cache, Tensor& v_cache,
                         const Tensor& lengths, at::TensorList weights_in, int64_t num_heads, double eps) {
  const CacheDims c = check_cache(k_cache, v_cache, lengths, num_heads);
  TORCH_CHECK(x.dim() == 3 && x.size(0) == c.batch && x.size(1) >= 1 && x.device().is_cpu(),
              "x: expected CPU [", c.batch, ", new tokens, hidden], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == k_cache.scalar_type(), "x: expected dtype ", k_cache.scalar_type(),
              " (as the KV cache), got ", x.scalar_type());
  TORCH_CHECK(static_cast<int64_t>(weights_in.size()) == c.layers * kLayerSlots, "weights: expected ",
              c.layers * kLayerSlots, " tensors (", kLayerSlots, " per layer for the cache's ", c.layers,
              " layers), got ", weights_in.size());
  const int64_t tokens = x.size(1), hidden = x.size(2);
  check_rotary(cos, "cos", c.batch * tokens, c.head_dim);
  check_rotary(sin, "sin", c.batch * tokens, c.head_dim);
  std::vector<Tensor> w(weights_in.begin(), weights_in.end());
  check_layer_weights(w, c.layers, hidden, num_heads, c.kv_heads, c.head_dim, k_cache.scalar_type());
  const Tensor out = run_layers(x.reshape({c.batch * tokens, hidden}).contiguous(), tokens, cos, sin, k_cache, v_cache,
                                lengths, w, num_heads, static_cast<float>(eps));
  return out.view(x.sizes());
}

Tensor decode_step_meta(const Tensor& ids, const Tensor&, const Tensor&, Tensor&, Tensor&, const Tensor&,
                        at::TensorList weights, int64_t, double) {
  const Tensor& head = weights[weights.size() - 2];
  return at::empty({ids.size(0), head.size(0)}, head.options());
}

Tensor decode_layers_meta(const Tensor& x, const Tensor&, const Tensor&, Tensor&, Tensor&, const Tensor&,
                          at::TensorList, int64_t, double) {
  return at::empty_like(x);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1engine, m) {
  m.def(
      "decode_step(Tensor ids, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor lengths, "
      "Tensor[] weights, int num_heads, float eps) -> Tensor");
  m.def(
      "decode_layers(Tensor x, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor lengths, "
      "Tensor[] weights, int num_heads, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(r1engine, CPU, m) {
  m.impl("decode_step", &decode_step_cpu);
  m.impl("decode_layers", &decode_layers_cpu);
}

TORCH_LIBRARY_IMPL(r1engine, Meta, m) {
  m.impl("decode_step", &decode_step_meta);
  m.impl("decode_layers", &decode_layers_meta);
}
