// Single-query attention over a ragged KV cache on the CPU (pure C++, no torch): one decode step of batched
// generation, where every row b has one new query per head and attends to its first n_keys[b] cached keys.
//
// Why a kernel: at decode time the work per (row, head) is a few dot products of head_dim elements; PyTorch's
// SDPA spends most of its ~300 us per call (64 rows, 6 heads, ~80 keys) on per-matrix overhead of batched GEMMs,
// mask handling and the GQA head expansion. Here each (row, KV head) is one task that reads its keys and values
// once for all the query heads that share them (grouped-query attention), with a numerically stable softmax in
// fp32.
//
// Layouts (contiguous): q [B, Hq, D]; k, v [B, Hkv, S, D] (one layer of the cache, S >= max n_keys);
// out [B, Hq, D]. Hq is a multiple of Hkv with at most 64 query heads per KV head; query head h reads KV head
// h / (Hq / Hkv). Rows with n_keys == 0 produce zeros. Element type fp32 or bf16 (all of q, k, v, out the same),
// accumulation in fp32.
#pragma once

#include <cstdint>

#include "core/grpo_loss.h"  // FloatType, bf16 conversions

namespace r1engine {

struct DecodeAttentionShape {
  int64_t batch = 0;
  int64_t q_heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  int64_t cache_len = 0;  // S: the key/value stride per head
};

void decode_attention(const void* q, const void* k, const void* v, const int64_t* n_keys, void* out,
                      const DecodeAttentionShape& shape, float scale, FloatType dtype);

}  // namespace r1engine
