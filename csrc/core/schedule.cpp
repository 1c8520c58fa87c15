#include "core/schedule.h"

#include <deque>
#include <map>
#include <stdexcept>
#include <tuple>
#include <utility>

namespace r1engine {

namespace {

std::string str(int v) { return std::to_string(v); }

// Emits the compute ops of one rank for the two-phase DualPipe/DualPipeV schedule. Phase 0 is the chain in
// which the rank sits `rr` stages from the input, phase 1 the one in which it sits `rr` stages from the loss.
struct TwoPhaseBuilder {
  std::vector<PipeOp>& out;
  int stage[2], slot[2], mb_base[2];
  int f_next[2] = {0, 0}, b_next[2] = {0, 0};
  std::deque<std::pair<int, int>> w_fifo;  // (mb, stage) whose weight gradients are deferred

  PipeOp f_op(int p) {
    PipeOp op;
    op.kind = OpKind::kF;
    op.mb = mb_base[p] + f_next[p]++;
    op.stage = stage[p];
    op.slot = slot[p];
    return op;
  }
  void F(int p) { out.push_back(f_op(p)); }
  void B(int p, bool zb) {
    PipeOp op;
    op.kind = OpKind::kB;
    op.mb = mb_base[p] + b_next[p]++;
    op.stage = stage[p];
    op.slot = slot[p];
    op.defer_w = zb ? 1 : 0;
    if (zb) w_fifo.emplace_back(op.mb, op.stage);
    out.push_back(op);
  }
  void W() {
    if (w_fifo.empty()) throw std::logic_error("schedule builder: W without a deferred B");
    PipeOp op;
    op.kind = OpKind::kW;
    op.mb = w_fifo.front().first;
    op.stage = w_fifo.front().second;
    op.slot = op.stage == stage[0] ? slot[0] : slot[1];
    w_fifo.pop_front();
    out.push_back(op);
  }
  void FB(int pf, int pb) {
    PipeOp op = f_op(pf);
    op.kind = OpKind::kFB;
    op.mb2 = mb_base[pb] + b_next[pb]++;
    op.stage2 = stage[pb];
    op.slot2 = slot[pb];
    out.push_back(op);
  }

  // The 8 steps of DeepSeek's DualPipe / DualPipeV for n (half-)ranks, position rr, c micro-batches per phase.
  void run(int n, int rr, int c, bool zb) {
    for (int i = 0; i < 2 * (n - rr - 1); ++i) F(0);  // 1: nF0
    for (int i = 0; i < rr + 1; ++i) {                // 2: nF0F1
      F(0);
      F(1);
    }
    for (int i = 0; i < n - rr - 1; ++i) {  // 3: nB1W1F1 (zero bubble)
      B(1, zb);
      if (zb) W();
      F(1);
    }
    const int step4 = c - 2 * n + rr + 1;  // 4: nF0B1F1B0 (main)
    for (int i = 0; i < step4; ++i) {
      if (i == 0 && rr == n - 1) {  // the turning rank does not overlap its first pair
        F(0);
        B(1, false);
      } else {
        FB(0, 1);
      }
      FB(1, 0);
    }
    for (int i = 0; i < n - rr - 1; ++i) {  // 5: nB1F1B0
      B(1, false);
      FB(1, 0);
    }
    bool use_zb = false;  // 6: nB1B0, the second half with zero bubble
    const int step6 = rr + 1;
    for (int i = 0; i < step6; ++i) {
      if (i == step6 / 2 && rr % 2 == 1) use_zb = zb;
      B(1, use_zb);
      if (i == step6 / 2 && rr % 2 == 0) use_zb = zb;
      B(0, use_zb);
    }
    for (int i = 0; i < n - rr - 1; ++i) {  // 7: nWB0 (zero bubble)
      if (zb) W();
      B(0, zb);
    }
    for (int i = 0; i < rr + 1; ++i)  // 8: nW
      if (zb) W();
    if (!w_fifo.empty()) throw std::logic_error("schedule builder: deferred W left over");
  }
};

void build_linear(PipeSchedule& s, bool split) {
  const int P = s.num_ranks, M = s.num_microbatches;
  for (int r = 0; r < P; ++r) {
    auto& out = s.ops[r];
    int f_next = 0, b_next = 0;
    std::deque<int> w_fifo;
    auto F = [&] {
      PipeOp op;
      op.kind = OpKind::kF;
      op.mb = f_next++;
      op.stage = r;
      op.slot = 0;
      out.push_back(op);
    };
    auto B = [&] {
      PipeOp op;
      op.kind = OpKind::kB;
      op.mb = b_next++;
      op.stage = r;
      op.slot = 0;
      op.defer_w = split ? 1 : 0;
      if (split) w_fifo.push_back(op.mb);
      out.push_back(op);
    };
    auto W = [&] {
      PipeOp op;
      op.kind = OpKind::kW;
      op.mb = w_fifo.front();
      op.stage = r;
      op.slot = 0;
      w_fifo.pop_front();
      out.push_back(op);
    };
    const int warm = std::min(P - r - 1, M);
    for (int i = 0; i < warm; ++i) F();
    // ZB-H1: rank r keeps up to r weight-gradient passes pending in the steady state, so that its input-grad
    // B reaches rank r-1 earlier; in the cool-down the pending W fill the waits for the next gradient.
    const int lag = r;
    for (int i = 0; i < M - warm; ++i) {
      F();
      B();
      if (split && static_cast<int>(w_fifo.size()) > lag) W();
    }
    for (int i = 0; i < warm; ++i) {
      B();
      if (split && !w_fifo.empty()) W();
    }
    while (split && !w_fifo.empty()) W();
  }
}

using MsgKey = std::tuple<int, int, int>;  // (mb, producer stage, grad)

void insert_communication(PipeSchedule& s) {
  const int P = s.num_ranks, S = s.num_stages;
  std::vector<std::vector<PipeOp>> compute = std::move(s.ops);
  s.ops.assign(P, {});
  // Per (sender, receiver): messages in the sender's program order.
  std::vector<std::vector<std::vector<MsgKey>>> sent(P, std::vector<std::vector<MsgKey>>(P));
  std::vector<std::vector<std::map<MsgKey, int>>> sent_index(P, std::vector<std::map<MsgKey, int>>(P));
  auto outputs = [&](const PipeOp& op, auto&& emit) {  // emit(mb, stage, grad, dst)
    auto fwd = [&](int mb, int st) {
      if (st + 1 < S) emit(mb, st, 0, s.rank_of(mb, st + 1));
    };
    auto bwd = [&](int mb, int st) {
      if (st > 0) emit(mb, st, 1, s.rank_of(mb, st - 1));
    };
    if (op.kind == OpKind::kF) fwd(op.mb, op.stage);
    if (op.kind == OpKind::kB) bwd(op.mb, op.stage);
    if (op.kind == OpKind::kFB) {
      fwd(op.mb, op.stage);
      bwd(op.mb2, op.stage2);
    }
  };
  auto inputs = [&](const PipeOp& op, auto&& need) {  // need(mb, producer stage, grad, src)
    auto fwd = [&](int mb, int st) {
      if (st > 0) need(mb, st - 1, 0, s.rank_of(mb, st - 1));
    };
    auto bwd = [&](int mb, int st) {
      if (st + 1 < S) need(mb, st + 1, 1, s.rank_of(mb, st + 1));
    };
    if (op.kind == OpKind::kF) fwd(op.mb, op.stage);
    if (op.kind == OpKind::kB) bwd(op.mb, op.stage);
    if (op.kind == OpKind::kFB) {
      fwd(op.mb, op.stage);
      bwd(op.mb2, op.stage2);
    }
  };
  for (int r = 0; r < P; ++r)
    for (const PipeOp& op : compute[r])
      outputs(op, [&](int mb, int st, int g, int dst) {
        if (dst == r) return;
        sent_index[r][dst][{mb, st, g}] = static_cast<int>(sent[r][dst].size());
        sent[r][dst].emplace_back(mb, st, g);
      });
  for (int r = 0; r < P; ++r) {
    std::vector<int> next_recv(P, 0);
    auto& out = s.ops[r];
    for (const PipeOp& op : compute[r]) {
      inputs(op, [&](int mb, int st, int g, int src) {
        if (src == r) return;
        auto it = sent_index[src][r].find({mb, st, g});
        if (it == sent_index[src][r].end())
          throw std::logic_error("schedule: rank " + str(r) + " needs a message that rank " + str(src) +
                                 " never sends (mb " + str(mb) + ", stage " + str(st) + ")");
        for (; next_recv[src] <= it->second; ++next_recv[src]) {
          auto [rmb, rst, rg] = sent[src][r][next_recv[src]];
          PipeOp rv;
          rv.kind = OpKind::kRecv;
          rv.mb = rmb;
          rv.stage = rst;
          rv.grad = rg;
          rv.peer = src;
          rv.tag = next_recv[src];
          out.push_back(rv);
        }
      });
      out.push_back(op);
      outputs(op, [&](int mb, int st, int g, int dst) {
        if (dst == r) return;
        PipeOp sd;
        sd.kind = OpKind::kSend;
        sd.mb = mb;
        sd.stage = st;
        sd.grad = g;
        sd.peer = dst;
        sd.tag = sent_index[r][dst].at({mb, st, g});
        out.push_back(sd);
      });
    }
  }
}

}  // namespace

int PipeSchedule::rank_of(int mb, int stage) const {
  switch (kind) {
    case ScheduleKind::kDualPipe:
      return mb < num_microbatches / 2 ? stage : num_ranks - 1 - stage;
    case ScheduleKind::kDualPipeV:
      return stage < num_ranks ? stage : 2 * num_ranks - 1 - stage;
    default:
      return stage;
  }
}

int PipeSchedule::slot_of(int mb, int stage) const {
  switch (kind) {
    case ScheduleKind::kDualPipe:
      return mb < num_microbatches / 2 ? 0 : 1;
    case ScheduleKind::kDualPipeV:
      return stage < num_ranks ? 0 : 1;
    default:
      return 0;
  }
}

const char* schedule_kind_name(ScheduleKind kind) {
  switch (kind) {
    case ScheduleKind::kOneFOneB:
      return "1f1b";
    case ScheduleKind::kZB1P:
      return "zb1p";
    case ScheduleKind::kDualPipe:
      return "dualpipe";
    case ScheduleKind::kDualPipeV:
      return "dualpipev";
  }
  return "?";
}

ScheduleKind schedule_kind_from_name(const std::string& name) {
  for (int k = 0; k < 4; ++k)
    if (name == schedule_kind_name(static_cast<ScheduleKind>(k))) return static_cast<ScheduleKind>(k);
  throw std::invalid_argument("schedule kind must be one of 1f1b, zb1p, dualpipe, dualpipev; got '" + name + "'");
}

void validate_schedule_args(ScheduleKind kind, int num_ranks, int num_microbatches) {
  if (num_ranks < 1) throw std::invalid_argument("num_ranks must be >= 1, got " + str(num_ranks));
  if (num_microbatches < 1)
    throw std::invalid_argument("num_microbatches must be >= 1, got " + str(num_microbatches));
  if (kind == ScheduleKind::kDualPipe) {
    if (num_ranks % 2 != 0)
      throw std::invalid_argument("DualPipe needs an even number of pipeline ranks (num_ranks), got " +
                                  str(num_ranks));
    if (num_microbatches % 2 != 0 || num_microbatches < 2 * num_ranks)
      throw std::invalid_argument("DualPipe needs num_microbatches even and >= 2 * num_ranks = " +
                                  str(2 * num_ranks) + ", got " + str(num_microbatches));
  }
  if (kind == ScheduleKind::kDualPipeV && num_microbatches < 2 * num_ranks)
    throw std::invalid_argument("DualPipeV needs num_microbatches >= 2 * num_ranks = " + str(2 * num_ranks) +
                                " (the number of stages), got " + str(num_microbatches));
}

PipeSchedule build_schedule(ScheduleKind kind, int num_ranks, int num_microbatches, bool zero_bubble) {
  validate_schedule_args(kind, num_ranks, num_microbatches);
  PipeSchedule s;
  s.kind = kind;
  s.num_ranks = num_ranks;
  s.num_microbatches = num_microbatches;
  s.num_stages = kind == ScheduleKind::kDualPipeV ? 2 * num_ranks : num_ranks;
  s.ops.assign(num_ranks, {});
  if (kind == ScheduleKind::kOneFOneB || kind == ScheduleKind::kZB1P) {
    build_linear(s, kind == ScheduleKind::kZB1P);
  } else if (kind == ScheduleKind::kDualPipeV) {
    const int N = num_ranks;
    for (int r = 0; r < N; ++r) {
      TwoPhaseBuilder b{s.ops[r], {r, 2 * N - 1 - r}, {0, 1}, {0, 0}, {0, 0}, {0, 0}, {}};
      b.run(N, r, num_microbatches, zero_bubble);
    }
  } else {
    const int P = num_ranks, H = P / 2, half = num_microbatches / 2;
    for (int r = 0; r < P; ++r) {
      const int h = std::min(r, P - 1 - r);
      const int d0 = r < H ? 0 : 1;  // direction (= slot) of phase 0 on this rank
      TwoPhaseBuilder b{s.ops[r], {h, P - 1 - h}, {d0, 1 - d0}, {d0 * half, (1 - d0) * half}, {0, 0}, {0, 0}, {}};
      b.run(H, h, half, zero_bubble);
    }
  }
  insert_communication(s);
  return s;
}

void flatten_schedule(const PipeSchedule& s, std::vector<int64_t>& rows, std::vector<int64_t>& offsets) {
  rows.clear();
  offsets.assign(1, 0);
  for (int r = 0; r < s.num_ranks; ++r) {
    for (const PipeOp& op : s.ops[r]) {
      const int64_t f[kPipeOpFields] = {r,       static_cast<int64_t>(op.kind), op.mb,
                                        op.stage, op.slot,
                                        op.mb2,   op.stage2,
                                        op.slot2, op.peer,
                                        (op.grad ? 1 : 0) | (op.defer_w ? 2 : 0),
                                        op.tag};
      rows.insert(rows.end(), f, f + kPipeOpFields);
    }
    offsets.push_back(static_cast<int64_t>(rows.size() / kPipeOpFields));
  }
}

}  // namespace r1engine
