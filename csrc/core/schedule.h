// Pipeline-parallel schedules: DualPipe, DualPipeV (DeepSeek), 1F1B and ZB1P (zero-bubble H1).
//
// A schedule is, for every rank, an ordered list of operations: compute ops (F = forward of one stage on
// one micro-batch, B = backward of that stage for its input gradient (and, unless deferred, its weight
// gradient), W = the deferred weight-gradient backward, FB = an F and a B overlapped in one slot) and
// explicit point-to-point communication ops (SEND / RECV of an activation or of a gradient).
//
// Stages form chains: a micro-batch runs F through stages 0..S-1 of its chain and B back from S-1 to 0.
//   * 1F1B / ZB1P : S = P stages, stage s on rank s (slot 0).
//   * DualPipe    : S = P stages, two chains. Micro-batches 0..M/2-1 enter at rank 0 (stage s on rank s,
//                   slot 0); micro-batches M/2..M-1 enter at rank P-1 (stage s on rank P-1-s, slot 1).
//                   Each stage's parameters therefore live on two ranks (r and P-1-r).
//   * DualPipeV   : S = 2P stages in one V-shaped chain: stage s < P on rank s (slot 0), stage s >= P on
//                   rank 2P-1-s (slot 1). Inputs and loss are both on rank 0.
// "slot" is the index of the local module (0 or 1) that holds the stage on its rank.
//
// Communication ops are derived from the data flow: a SEND right after the op that produces a tensor for
// another rank, a RECV (a non-blocking post) placed before the op that consumes it, with the RECVs of every
// (sender, receiver) pair posted in the sender's SEND order, so tag-less FIFO matching (NCCL) and tagged
// matching (gloo, tag = per-pair sequence number) pair the same messages.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace r1engine {

enum class ScheduleKind : int { kOneFOneB = 0, kZB1P = 1, kDualPipe = 2, kDualPipeV = 3 };

enum class OpKind : int { kF = 0, kB = 1, kW = 2, kFB = 3, kSend = 4, kRecv = 5 };

// One operation. For F/B/W: (mb, stage, slot) name the chunk. For FB: (mb, stage, slot) is the forward part
// and (mb2, stage2, slot2) the backward part. For SEND/RECV: (mb, stage) name the PRODUCER of the tensor
// (the stage whose output activation, or whose input gradient, travels), peer the other rank, grad = 1 for a
// gradient message, 0 for an activation, and tag the per-(sender, receiver) sequence number.
// defer_w (B, and the B part of FB): 1 when this B computes only input gradients and a later W computes the
// weight gradients of the same (mb, stage).
struct PipeOp {
  OpKind kind = OpKind::kF;
  int mb = -1, stage = -1, slot = -1;
  int mb2 = -1, stage2 = -1, slot2 = -1;
  int peer = -1;
  int grad = 0;
  int defer_w = 0;
  int tag = -1;
};

inline constexpr int kPipeOpFields = 11;  // rank, kind, mb, stage, slot, mb2, stage2, slot2, peer, flags, tag
// flags encoding in the flat form: bit 0 = grad (SEND/RECV), bit 1 = defer_w (B / FB).

struct PipeSchedule {
  ScheduleKind kind = ScheduleKind::kOneFOneB;
  int num_ranks = 0;
  int num_stages = 0;
  int num_microbatches = 0;
  std::vector<std::vector<PipeOp>> ops;  // ops[rank] in execution order

  // Placement of (micro-batch, stage) on ranks / local module slots, and the chain length.
  int rank_of(int mb, int stage) const;
  int slot_of(int mb, int stage) const;
  // Micro-batch enters at rank input_rank(mb) and its loss is computed at rank_of(mb, num_stages - 1).
  int input_rank(int mb) const { return rank_of(mb, 0); }
};

const char* schedule_kind_name(ScheduleKind kind);
ScheduleKind schedule_kind_from_name(const std::string& name);  // throws std::invalid_argument

// Throws std::invalid_argument naming the violated constraint:
//   all: num_ranks >= 1, num_microbatches >= 1;
//   DualPipe: num_ranks even, num_microbatches even and >= 2 * num_ranks;
//   DualPipeV: num_microbatches >= 2 * num_ranks (the number of stages).
void validate_schedule_args(ScheduleKind kind, int num_ranks, int num_microbatches);

// Builds the schedule. zero_bubble: for DualPipe/DualPipeV, whether B/W splitting is used where the published
// schedule uses it (if false every B is a full backward and no W op is emitted). 1F1B never splits, ZB1P always.
PipeSchedule build_schedule(ScheduleKind kind, int num_ranks, int num_microbatches, bool zero_bubble = true);

// Flat encoding: rows of kPipeOpFields int64 per op (ranks concatenated in order), offsets[num_ranks + 1].
void flatten_schedule(const PipeSchedule& s, std::vector<int64_t>& rows, std::vector<int64_t>& offsets);

}  // namespace r1engine
