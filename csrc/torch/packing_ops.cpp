// torch.ops.r1engine.packing_plan: the best-fit packing planner of csrc/core/packing.* on an int64 tensor.
#include <torch/library.h>
#include <torch/torch.h>

#include <stdexcept>
#include <tuple>
#include <vector>

#include "core/packing.h"

namespace {

template <typename T>
at::Tensor to_tensor(std::vector<T>&& v, at::ScalarType dtype) {
  auto* holder = new std::vector<T>(std::move(v));
  const int64_t size = static_cast<int64_t>(holder->size());
  return torch::from_blob(
      holder->data(), {size}, [holder](void*) { delete holder; }, torch::TensorOptions().dtype(dtype));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
packing_plan(const at::Tensor& lengths, int64_t chunk_len, int64_t num_ranks, c10::string_view cost, double attn_coef,
             int64_t min_chunks_per_rank, int64_t chunk_multiple) {
  TORCH_CHECK_VALUE(lengths.dim() == 1, "packing_plan: lengths must be 1-D, got shape ", lengths.sizes());
  TORCH_CHECK_VALUE(lengths.scalar_type() == at::kLong, "packing_plan: lengths must be int64, got ",
                    lengths.scalar_type());
  TORCH_CHECK_VALUE(lengths.device().is_cpu(), "packing_plan: lengths must be a CPU tensor, got ", lengths.device());
  r1engine::PackingOptions o;
  o.chunk_len = chunk_len;
  o.num_ranks = num_ranks;
  if (cost == "tokens") {
    o.cost = r1engine::PackingCost::kTokens;
  } else if (cost == "attention") {
    o.cost = r1engine::PackingCost::kAttention;
  } else {
    TORCH_CHECK_VALUE(false, "packing_plan: cost must be 'tokens' or 'attention', got '", std::string(cost), "'");
  }
  o.attn_coef = attn_coef;
  o.min_chunks_per_rank = min_chunks_per_rank;
  o.chunk_multiple = chunk_multiple;
  const at::Tensor lens = lengths.contiguous();
  r1engine::PackingResult r;
  try {
    r = r1engine::plan_packing(lens.data_ptr<int64_t>(), lens.numel(), o);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  std::vector<int64_t> stats = {r.total_tokens, r.lower_bound, r.bfd_chunks};
  return {to_tensor(std::move(r.seq_index), at::kLong),    to_tensor(std::move(r.seq_offset), at::kLong),
          to_tensor(std::move(r.chunk_ptr), at::kLong),    to_tensor(std::move(r.rank_ptr), at::kLong),
          to_tensor(std::move(r.chunk_tokens), at::kLong), to_tensor(std::move(r.chunk_cost), at::kDouble),
          to_tensor(std::move(r.rank_load), at::kDouble),  to_tensor(std::move(stats), at::kLong)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1engine, m) {
  m.def(
      "packing_plan(Tensor lengths, int chunk_len, int num_ranks, str cost, float attn_coef, int min_chunks_per_rank, "
      "int chunk_multiple) -> (Tensor seq_index, Tensor seq_offset, Tensor chunk_ptr, Tensor rank_ptr, "
      "Tensor chunk_tokens, Tensor chunk_cost, Tensor rank_load, Tensor stats)");
}

TORCH_LIBRARY_IMPL(r1engine, CPU, m) { m.impl("packing_plan", &packing_plan); }
