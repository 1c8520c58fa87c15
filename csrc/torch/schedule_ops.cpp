// torch.ops.r1engine.pipeline_schedule / pipeline_simulate: the schedule generator and simulator of
// csrc/core/schedule.* and csrc/core/pipeline_sim.* with int64 / float64 tensors in and out.
#include <torch/library.h>
#include <torch/torch.h>

#include <stdexcept>
#include <string>
#include <tuple>

#include "core/pipeline_sim.h"
#include "core/schedule.h"

namespace {

using r1engine::kPipeOpFields;

// Returns (ops int64 [num_ops, 11], offsets int64 [num_ranks + 1]); rows of rank r are offsets[r]..offsets[r+1].
std::tuple<at::Tensor, at::Tensor> pipeline_schedule(const std::string& kind, int64_t num_ranks,
                                                     int64_t num_microbatches, bool zero_bubble) {
  r1engine::PipeSchedule s;
  try {
    s = r1engine::build_schedule(r1engine::schedule_kind_from_name(kind), static_cast<int>(num_ranks),
                                 static_cast<int>(num_microbatches), zero_bubble);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  std::vector<int64_t> rows, offsets;
  r1engine::flatten_schedule(s, rows, offsets);
  const int64_t n = static_cast<int64_t>(rows.size()) / kPipeOpFields;
  at::Tensor ops = torch::from_blob(rows.data(), {n, kPipeOpFields}, torch::kInt64).clone();
  at::Tensor offs = torch::from_blob(offsets.data(), {static_cast<int64_t>(offsets.size())}, torch::kInt64).clone();
  return {ops, offs};
}

r1engine::PipeSchedule unflatten(const at::Tensor& ops, const at::Tensor& offsets, const std::string& kind,
                                 int64_t num_ranks, int64_t num_microbatches) {
  TORCH_CHECK_VALUE(ops.dim() == 2 && ops.size(1) == kPipeOpFields && ops.scalar_type() == torch::kInt64,
                    "ops must be an int64 tensor [num_ops, ", kPipeOpFields, "], got ", ops.sizes(), " ",
                    ops.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == num_ranks + 1 && offsets.scalar_type() == torch::kInt64,
                    "offsets must be an int64 tensor [num_ranks + 1 = ", num_ranks + 1, "], got ", offsets.sizes());
  r1engine::PipeSchedule s;
  try {
    s.kind = r1engine::schedule_kind_from_name(kind);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  s.num_ranks = static_cast<int>(num_ranks);
  s.num_microbatches = static_cast<int>(num_microbatches);
  s.num_stages = s.kind == r1engine::ScheduleKind::kDualPipeV ? 2 * s.num_ranks : s.num_ranks;
  s.ops.assign(s.num_ranks, {});
  const at::Tensor o = ops.contiguous(), off = offsets.contiguous();
  const int64_t* d = o.data_ptr<int64_t>();
  const int64_t* f = off.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(f[0] == 0 && f[num_ranks] == ops.size(0), "offsets must start at 0 and end at num_ops");
  for (int r = 0; r < s.num_ranks; ++r) {
    TORCH_CHECK_VALUE(f[r] <= f[r + 1], "offsets must be non-decreasing");
    for (int64_t i = f[r]; i < f[r + 1]; ++i) {
      const int64_t* row = d + i * kPipeOpFields;
      TORCH_CHECK_VALUE(row[1] >= 0 && row[1] <= 5, "op kind must be in 0..5, got ", row[1], " at row ", i);
      r1engine::PipeOp op;
      op.kind = static_cast<r1engine::OpKind>(row[1]);
      op.mb = static_cast<int>(row[2]);
      op.stage = static_cast<int>(row[3]);
      op.slot = static_cast<int>(row[4]);
      op.mb2 = static_cast<int>(row[5]);
      op.stage2 = static_cast<int>(row[6]);
      op.slot2 = static_cast<int>(row[7]);
      op.peer = static_cast<int>(row[8]);
      op.grad = static_cast<int>(row[9] & 1);
      op.defer_w = static_cast<int>((row[9] >> 1) & 1);
      op.tag = static_cast<int>(row[10]);
      s.ops[r].push_back(op);
    }
  }
  return s;
}

// Returns (times float64 [num_ops, 2] = start, end of each row of ops; per_rank float64 [num_ranks, 5] =
// busy, finish, bubble, peak live chunks, peak live chunks counting deferred W; makespan float64 scalar).
// Raises RuntimeError("pipeline schedule invalid: ...") on a dependency, matching or deadlock violation.
std::tuple<at::Tensor, at::Tensor, at::Tensor> pipeline_simulate(const at::Tensor& ops, const at::Tensor& offsets,
                                                                 const std::string& kind, int64_t num_ranks,
                                                                 int64_t num_microbatches, double f, double b,
                                                                 double w, double fb, double latency,
                                                                 int64_t comm_mode) {
  TORCH_CHECK_VALUE(comm_mode >= 0 && comm_mode <= 2,
                    "comm_mode must be 0 (isend/irecv), 1 (blocking recv) or 2 (synchronous send/recv), got ", comm_mode);
  const r1engine::PipeSchedule s = unflatten(ops, offsets, kind, num_ranks, num_microbatches);
  r1engine::PipeCosts c;
  c.f = f;
  c.b = b;
  c.w = w;
  c.fb = fb;
  c.latency = latency;
  r1engine::PipeSimResult res;
  try {
    res = r1engine::simulate_schedule(s, c, static_cast<r1engine::CommMode>(comm_mode));
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
  at::Tensor times = torch::empty({ops.size(0), 2}, torch::kFloat64);
  auto t = times.accessor<double, 2>();
  int64_t row = 0;
  for (int r = 0; r < s.num_ranks; ++r)
    for (size_t i = 0; i < s.ops[r].size(); ++i, ++row) {
      t[row][0] = res.start[r][i];
      t[row][1] = res.end[r][i];
    }
  at::Tensor per_rank = torch::empty({num_ranks, 5}, torch::kFloat64);
  auto p = per_rank.accessor<double, 2>();
  for (int r = 0; r < s.num_ranks; ++r) {
    p[r][0] = res.busy[r];
    p[r][1] = res.finish[r];
    p[r][2] = res.bubble[r];
    p[r][3] = res.peak_activations[r];
    p[r][4] = res.peak_activations_w[r];
  }
  return {times, per_rank, torch::scalar_tensor(res.makespan, torch::kFloat64)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1engine, m) {
  m.def("pipeline_schedule(str kind, int num_ranks, int num_microbatches, bool zero_bubble) -> (Tensor, Tensor)");
  m.def(
      "pipeline_simulate(Tensor ops, Tensor offsets, str kind, int num_ranks, int num_microbatches, float f, "
      "float b, float w, float fb, float latency, int comm_mode) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(r1engine, CompositeExplicitAutograd, m) {
  m.impl("pipeline_schedule", &pipeline_schedule);
}

TORCH_LIBRARY_IMPL(r1engine, CPU, m) {
  m.impl("pipeline_simulate", &pipeline_simulate);
}
