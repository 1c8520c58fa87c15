// Attention over packed variable-length sequences on the CPU (pure C++, no torch), forward and backward: the
// training-time attention of a packed row, where every sequence attends only to itself (causally by default).
//
// Why a kernel: the packed rows of GRPO training hold many short sequences (tens to a few hundred tokens). PyTorch
// needs one padded batched SDPA call per length bucket plus gathers, GQA head copies and scatters around it, and
// the autograd bookkeeping of all of them. Here one task per (sequence, KV head) materialises the small T x T
// score block of each query head of the group in a scratch buffer (no tiling of keys, no online softmax; long
// sequences are processed in blocks of query rows so the scratch stays bounded) and runs the products with a
// register-blocked SIMD micro-kernel.
//
// Layouts (contiguous): q, out, dq [total, Hq, D]; k, v, dk, dv [total, Hkv, D]; lse [total, Hq] fp32 (natural
// log-sum-exp of the scaled scores of each query row, what the backward recomputes the probabilities from);
// cu_seqlens [num_seqs + 1] rising from 0 to total (empty sequences allowed). Hq is a multiple of Hkv; query
// head h reads KV head h / (Hq / Hkv). Element type fp32 or bf16 (all tensors but lse the same), fp32
// accumulation. The backward is deterministic: every output element is written by one task in a fixed order.
#pragma once

#include <cstdint>

#include "core/grpo_loss.h"  // FloatType, bf16 conversions

namespace r1engine {

struct VarlenAttentionShape {
  int64_t total = 0;
  int64_t num_seqs = 0;
  int64_t q_heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
};

// out = softmax(scale * q k^T [causal mask]) v per sequence and head; lse as above.
void varlen_attention_fwd(const void* q, const void* k, const void* v, const int32_t* cu_seqlens, void* out,
                          float* lse, const VarlenAttentionShape& shape, float scale, bool causal, FloatType dtype);

// Gradients of the forward (flash-attention style, the probabilities recomputed from q, k and lse):
//   P = exp(S - lse), dV = P^T dO, dP = dO V^T, delta_i = dO_i . O_i, dS = P * (dP - delta),
//   dQ = scale dS K, dK = scale dS^T Q (dK, dV summed over the query heads of each KV head).
void varlen_attention_bwd(const void* dout, const void* q, const void* k, const void* v, const void* out,
                          const float* lse, const int32_t* cu_seqlens, void* dq, void* dk, void* dv,
                          const VarlenAttentionShape& shape, float scale, bool causal, FloatType dtype);

}  // namespace r1engine
