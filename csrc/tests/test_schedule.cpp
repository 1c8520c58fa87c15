// Unit tests of the pipeline schedule generator (csrc/core/schedule.*).
#include <map>
#include <stdexcept>
#include <string>
#include <tuple>

#include "core/schedule.h"
#include "tests/check.h"

using namespace r1engine;

namespace {

bool throws_with(ScheduleKind k, int ranks, int mbs, const std::string& needle) {
  try {
    build_schedule(k, ranks, mbs);
  } catch (const std::invalid_argument& e) {
    return std::string(e.what()).find(needle) != std::string::npos;
  }
  return false;
}

// Every (mb, stage) chunk: one F and one B on the rank that holds it, W iff deferred; counts per rank.
void check_structure(ScheduleKind kind, int P, int M, bool zb) {
  const PipeSchedule s = build_schedule(kind, P, M, zb);
  R1_CHECK(static_cast<int>(s.ops.size()) == P);
  const int S = s.num_stages;
  R1_CHECK(S == (kind == ScheduleKind::kDualPipeV ? 2 * P : P));
  std::map<std::tuple<int, int>, int> nf, nb, nw, deferred;
  int sends = 0, recvs = 0;
  for (int r = 0; r < P; ++r) {
    int f_here = 0;
    for (const PipeOp& op : s.ops[r]) {
      switch (op.kind) {
        case OpKind::kF:
          nf[{op.mb, op.stage}]++;
          R1_CHECK(s.rank_of(op.mb, op.stage) == r);
          ++f_here;
          break;
        case OpKind::kB:
          nb[{op.mb, op.stage}]++;
          if (op.defer_w) deferred[{op.mb, op.stage}]++;
          R1_CHECK(s.rank_of(op.mb, op.stage) == r);
          break;
        case OpKind::kFB:
          nf[{op.mb, op.stage}]++;
          nb[{op.mb2, op.stage2}]++;
          R1_CHECK(s.rank_of(op.mb, op.stage) == r && s.rank_of(op.mb2, op.stage2) == r);
          R1_CHECK(op.slot == s.slot_of(op.mb, op.stage) && op.slot2 == s.slot_of(op.mb2, op.stage2));
          ++f_here;
          break;
        case OpKind::kW:
          nw[{op.mb, op.stage}]++;
          break;
        case OpKind::kSend:
          ++sends;
          R1_CHECK(op.peer != r);
          break;
        case OpKind::kRecv:
          ++recvs;
          R1_CHECK(op.peer != r);
          break;
      }
    }
    // Each rank runs as many forwards as it holds (mb, stage) chunks.
    const int expect = kind == ScheduleKind::kDualPipeV ? 2 * M : (kind == ScheduleKind::kDualPipe ? M : M);
    R1_CHECK(f_here == expect);
  }
  R1_CHECK(sends == recvs);
  for (int mb = 0; mb < M; ++mb)
    for (int st = 0; st < S; ++st) {
      const auto key = std::make_tuple(mb, st);
      R1_CHECK(nf[key] == 1);
      R1_CHECK(nb[key] == 1);
      R1_CHECK(nw[key] == deferred[key]);
      if (!zb || kind == ScheduleKind::kOneFOneB) R1_CHECK(deferred[key] == 0);
      if (kind == ScheduleKind::kZB1P) R1_CHECK(deferred[key] == 1);
    }
}

}  // namespace

int main() {
  // Placement.
  {
    const PipeSchedule d = build_schedule(ScheduleKind::kDualPipe, 4, 8);
    R1_CHECK(d.rank_of(0, 0) == 0 && d.rank_of(0, 3) == 3);  // first half enters at rank 0
    R1_CHECK(d.rank_of(4, 0) == 3 && d.rank_of(4, 3) == 0);  // second half enters at rank P-1
    R1_CHECK(d.slot_of(0, 1) == 0 && d.slot_of(7, 1) == 1);
    const PipeSchedule v = build_schedule(ScheduleKind::kDualPipeV, 3, 6);
    R1_CHECK(v.num_stages == 6);
    R1_CHECK(v.rank_of(0, 2) == 2 && v.rank_of(0, 3) == 2 && v.rank_of(0, 5) == 0);
    R1_CHECK(v.slot_of(0, 2) == 0 && v.slot_of(0, 3) == 1);
  }
  // Structure for many shapes.
  for (bool zb : {true, false}) {
    for (int P : {2, 4, 6, 8})
      for (int M : {2 * P, 2 * P + 2, 4 * P}) check_structure(ScheduleKind::kDualPipe, P, M, zb);
    for (int P : {1, 2, 3, 4, 5})
      for (int M : {2 * P, 2 * P + 1, 3 * P + 2}) check_structure(ScheduleKind::kDualPipeV, P, M, zb);
  }
  for (int P : {1, 2, 3, 4, 7})
    for (int M : {1, P, 2 * P + 1}) {
      check_structure(ScheduleKind::kOneFOneB, P, M, true);
      check_structure(ScheduleKind::kZB1P, P, M, true);
    }
  // DualPipeV on one rank: no communication at all (the V turns locally).
  {
    const PipeSchedule v = build_schedule(ScheduleKind::kDualPipeV, 1, 2);
    for (const PipeOp& op : v.ops[0]) R1_CHECK(op.kind != OpKind::kSend && op.kind != OpKind::kRecv);
  }
  // Overlapped F&B slots exist in the DualPipe main phase.
  {
    const PipeSchedule d = build_schedule(ScheduleKind::kDualPipe, 4, 12);
    int fb = 0;
    for (const PipeOp& op : d.ops[0]) fb += op.kind == OpKind::kFB;
    R1_CHECK(fb > 0);
  }
  // Flat encoding.
  {
    const PipeSchedule d = build_schedule(ScheduleKind::kDualPipeV, 2, 4);
    std::vector<int64_t> rows, offsets;
    flatten_schedule(d, rows, offsets);
    R1_CHECK(offsets.size() == 3);
    R1_CHECK(offsets[0] == 0);
    R1_CHECK(static_cast<size_t>(offsets[2]) * kPipeOpFields == rows.size());
    R1_CHECK(static_cast<size_t>(offsets[1]) == d.ops[0].size());
    R1_CHECK(rows[offsets[1] * kPipeOpFields] == 1);  // first op of rank 1 has rank field 1
  }
  // Names.
  R1_CHECK(schedule_kind_from_name("dualpipev") == ScheduleKind::kDualPipeV);
  R1_CHECK(std::string(schedule_kind_name(ScheduleKind::kZB1P)) == "zb1p");
  bool bad_name = false;
  try {
    schedule_kind_from_name("gpipe");
  } catch (const std::invalid_argument&) {
    bad_name = true;
  }
  R1_CHECK(bad_name);
  // Bad arguments name the constraint.
  R1_CHECK(throws_with(ScheduleKind::kDualPipe, 3, 12, "even number of pipeline ranks"));
  R1_CHECK(throws_with(ScheduleKind::kDualPipe, 4, 6, ">= 2 * num_ranks = 8"));
  R1_CHECK(throws_with(ScheduleKind::kDualPipe, 4, 9, "even"));
  R1_CHECK(throws_with(ScheduleKind::kDualPipeV, 4, 7, ">= 2 * num_ranks = 8"));
  R1_CHECK(throws_with(ScheduleKind::kOneFOneB, 0, 4, "num_ranks must be >= 1"));
  R1_CHECK(throws_with(ScheduleKind::kZB1P, 2, 0, "num_microbatches must be >= 1"));
  return r1_check_report("test_schedule");
}
