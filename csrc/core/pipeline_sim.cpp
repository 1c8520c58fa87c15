#include "core/pipeline_sim.h"

#include <algorithm>
#include <map>
#include <stdexcept>
#include <string>
#include <tuple>

namespace r1engine {

namespace {

std::string str(int v) { return std::to_string(v); }

const char* kind_name(OpKind k) {
  switch (k) {
    case OpKind::kF:
      return "F";
    case OpKind::kB:
      return "B";
    case OpKind::kW:
      return "W";
    case OpKind::kFB:
      return "F&B";
    case OpKind::kSend:
      return "SEND";
    case OpKind::kRecv:
      return "RECV";
  }
  return "?";
}

std::string describe(int rank, size_t i, const PipeOp& op) {
  std::string d = "rank " + str(rank) + " op #" + std::to_string(i) + " " + kind_name(op.kind) + "(mb " +
                  str(op.mb) + ", stage " + str(op.stage);
  if (op.kind == OpKind::kFB) d += "; B: mb " + str(op.mb2) + ", stage " + str(op.stage2);
  if (op.kind == OpKind::kSend || op.kind == OpKind::kRecv)
    d += std::string(op.grad ? ", grad" : ", act") + ", peer " + str(op.peer) + ", tag " + str(op.tag);
  return d + ")";
}

[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error("pipeline schedule invalid: " + msg); }

struct Msg {
  int mb, stage, grad, tag;
  double time;
};

}  // namespace

double op_cost(const PipeOp& op, const PipeCosts& c) {
  switch (op.kind) {
    case OpKind::kF:
      return c.f;
    case OpKind::kB:
      return op.defer_w ? c.b - c.w : c.b;
    case OpKind::kW:
      return c.w;
    case OpKind::kFB:
      return (c.fb < 0 ? c.f + c.b : c.fb) - (op.defer_w ? c.w : 0.0);
    default:
      return 0.0;
  }
}

PipeSimResult simulate_schedule(const PipeSchedule& s, const PipeCosts& costs, CommMode mode) {
  const int P = s.num_ranks, S = s.num_stages, M = s.num_microbatches;
  if (static_cast<int>(s.ops.size()) != P) fail("ops has " + str(static_cast<int>(s.ops.size())) + " ranks, not " + str(P));
  const double NaN = -1.0;
  // Completion times (-1 = not yet) of F, B, W per (mb, stage); whether B deferred its W.
  std::vector<double> tF(M * S, NaN), tB(M * S, NaN), tW(M * S, NaN);
  std::vector<int> deferred(M * S, 0);
  auto idx = [&](int mb, int st) { return mb * S + st; };
  // Messages per (sender, receiver): sends in program order; receives posted in program order.
  std::vector<std::vector<Msg>> sends(P * P);
  std::vector<std::vector<Msg>> posts(P * P);
  // Receiver-side lookup: (mb, stage, grad) -> index of the post in posts[src * P + r].
  std::vector<std::map<std::tuple<int, int, int>, std::pair<int, int>>> posted(P);

  PipeSimResult res;
  res.busy.assign(P, 0.0);
  res.finish.assign(P, 0.0);
  res.peak_activations.assign(P, 0);
  res.peak_activations_w.assign(P, 0);
  res.start.resize(P);
  res.end.resize(P);
  for (int r = 0; r < P; ++r) {
    res.start[r].assign(s.ops[r].size(), 0.0);
    res.end[r].assign(s.ops[r].size(), 0.0);
  }
  std::vector<size_t> pc(P, 0);
  std::vector<double> now(P, 0.0);
  std::vector<int> live(P, 0), live_w(P, 0);
  std::vector<char> recv_posted(P, 0);  // the rank's current RECV has been posted (blocking modes)

  auto check_chunk = [&](int r, size_t i, const PipeOp& op, int mb, int st, int slot) {
    if (mb < 0 || mb >= M || st < 0 || st >= S) fail(describe(r, i, op) + ": micro-batch or stage out of range");
    if (s.rank_of(mb, st) != r || s.slot_of(mb, st) != slot)
      fail(describe(r, i, op) + ": stage " + str(st) + " of micro-batch " + str(mb) + " belongs to rank " +
           str(s.rank_of(mb, st)) + " slot " + str(s.slot_of(mb, st)));
  };
  // Arrival time of the input of a compute op, or -1 if it must wait. Throws if it can never arrive.
  auto input_time = [&](int r, size_t i, const PipeOp& op, int mb, int prod_stage, int grad) -> double {
    const int src = s.rank_of(mb, prod_stage);
    const int k = idx(mb, prod_stage);
    if (src == r) {
      const double t = grad ? tB[k] : tF[k];
      if (t < 0) fail(describe(r, i, op) + ": its input from stage " + str(prod_stage) +
                      " on the same rank is produced later in program order");
      return t;
    }
    auto it = posted[r].find({mb, prod_stage, grad});
    if (it == posted[r].end())
      fail(describe(r, i, op) + ": consumes a message from rank " + str(src) + " without a preceding RECV");
    const auto [pair, pos] = it->second;
    if (static_cast<int>(sends[pair].size()) <= pos) return -1.0;  // not sent yet
    return sends[pair][pos].time + costs.latency;
  };

  int remaining = 0;
  for (int r = 0; r < P; ++r) remaining += static_cast<int>(s.ops[r].size());
  while (remaining > 0) {
    bool progress = false;
    for (int r = 0; r < P; ++r) {
      while (pc[r] < s.ops[r].size()) {
        const size_t i = pc[r];
        const PipeOp& op = s.ops[r][i];
        double ready = now[r];
        bool wait = false;
        auto need = [&](double t) {
          if (t < 0) wait = true;
          else ready = std::max(ready, t);
        };
        switch (op.kind) {
          case OpKind::kF:
          case OpKind::kFB: {
            check_chunk(r, i, op, op.mb, op.stage, op.slot);
            if (tF[idx(op.mb, op.stage)] >= 0) fail(describe(r, i, op) + ": second forward of this chunk");
            if (op.stage > 0) need(input_time(r, i, op, op.mb, op.stage - 1, 0));
            if (op.kind == OpKind::kF) break;
            [[fallthrough]];
          }
          case OpKind::kB: {
            const int mb = op.kind == OpKind::kFB ? op.mb2 : op.mb;
            const int st = op.kind == OpKind::kFB ? op.stage2 : op.stage;
            check_chunk(r, i, op, mb, st, op.kind == OpKind::kFB ? op.slot2 : op.slot);
            if (tB[idx(mb, st)] >= 0) fail(describe(r, i, op) + ": second backward of this chunk");
            if (tF[idx(mb, st)] < 0) fail(describe(r, i, op) + ": backward before the forward of the chunk");
            if (st + 1 < S) need(input_time(r, i, op, mb, st + 1, 1));
            break;
          }
          case OpKind::kW: {
            check_chunk(r, i, op, op.mb, op.stage, op.slot);
            const int k = idx(op.mb, op.stage);
            if (tB[k] < 0 || !deferred[k]) fail(describe(r, i, op) + ": W without an earlier deferring B");
            if (tW[k] >= 0) fail(describe(r, i, op) + ": second W of this chunk");
            break;
          }
          case OpKind::kSend: {
            if (op.peer < 0 || op.peer >= P || op.peer == r) fail(describe(r, i, op) + ": bad peer");
            if (op.mb < 0 || op.mb >= M || op.stage < 0 || op.stage >= S || s.rank_of(op.mb, op.stage) != r)
              fail(describe(r, i, op) + ": sends a tensor this rank does not produce");
            const double t = op.grad ? tB[idx(op.mb, op.stage)] : tF[idx(op.mb, op.stage)];
            if (t < 0) fail(describe(r, i, op) + ": sends a tensor before computing it");
            const int dst_stage = op.grad ? op.stage - 1 : op.stage + 1;
            if (dst_stage < 0 || dst_stage >= S || s.rank_of(op.mb, dst_stage) != op.peer)
              fail(describe(r, i, op) + ": peer does not hold the consuming stage");
            if (mode == CommMode::kSynchronous) {  // rendezvous: wait until the receiver has posted the RECV
              const int pair = r * P + op.peer;
              const size_t pos = sends[pair].size();
              if (posts[pair].size() <= pos) wait = true;
              else need(posts[pair][pos].time);
            }
            break;
          }
          case OpKind::kRecv: {
            if (op.peer < 0 || op.peer >= P || op.peer == r) fail(describe(r, i, op) + ": bad peer");
            const int pair = op.peer * P + r;
            if (!recv_posted[r]) {  // post the receive (non-blocking part)
              const int pos = static_cast<int>(posts[pair].size());
              if (op.tag != pos) fail(describe(r, i, op) + ": tag is not the per-pair sequence number " + str(pos));
              if (!posted[r].emplace(std::make_tuple(op.mb, op.stage, op.grad), std::make_pair(pair, pos)).second)
                fail(describe(r, i, op) + ": second RECV of the same message");
              posts[pair].push_back({op.mb, op.stage, op.grad, op.tag, now[r]});
              recv_posted[r] = 1;
              progress = true;
            }
            if (mode != CommMode::kAsync) {  // blocking: the RECV completes when the message has arrived
              const size_t pos = posts[pair].size() - 1;
              if (sends[pair].size() <= pos) wait = true;
              else need(sends[pair][pos].time + costs.latency);
            }
            break;
          }
        }
        if (wait) break;
        // Execute.
        const double cost = op_cost(op, costs);
        res.start[r][i] = ready;
        res.end[r][i] = ready + cost;
        now[r] = ready + cost;
        res.busy[r] += cost;
        switch (op.kind) {
          case OpKind::kF:
          case OpKind::kFB: {
            tF[idx(op.mb, op.stage)] = now[r];
            live[r]++;
            live_w[r]++;
            res.peak_activations[r] = std::max(res.peak_activations[r], live[r]);
            res.peak_activations_w[r] = std::max(res.peak_activations_w[r], live_w[r]);
            if (op.kind == OpKind::kF) break;
            [[fallthrough]];
          }
          case OpKind::kB: {
            const int mb = op.kind == OpKind::kFB ? op.mb2 : op.mb;
            const int st = op.kind == OpKind::kFB ? op.stage2 : op.stage;
            tB[idx(mb, st)] = now[r];
            deferred[idx(mb, st)] = op.defer_w;
            live[r]--;
            if (!op.defer_w) live_w[r]--;
            break;
          }
          case OpKind::kW:
            tW[idx(op.mb, op.stage)] = now[r];
            live_w[r]--;
            break;
          case OpKind::kSend: {
            const int pair = r * P + op.peer;
            if (op.tag != static_cast<int>(sends[pair].size()))
              fail(describe(r, i, op) + ": tag is not the per-pair sequence number " + str(static_cast<int>(sends[pair].size())));
            sends[pair].push_back({op.mb, op.stage, op.grad, op.tag, now[r]});
            break;
          }
          case OpKind::kRecv:
            recv_posted[r] = 0;
            break;
        }
        res.finish[r] = now[r];
        ++pc[r];
        --remaining;
        progress = true;
      }
    }
    if (!progress) {
      std::string msg = "deadlock: every unfinished rank waits for a message (or, with synchronous sends, a "
                        "receive) that never comes:";
      for (int r = 0; r < P; ++r)
        if (pc[r] < s.ops[r].size()) msg += " [" + describe(r, pc[r], s.ops[r][pc[r]]) + "]";
      fail(msg);
    }
  }
  // Message matching: the i-th send of a pair is the i-th posted receive, with identical contents.
  for (int a = 0; a < P; ++a)
    for (int b = 0; b < P; ++b) {
      const auto& sd = sends[a * P + b];
      const auto& rv = posts[a * P + b];
      if (sd.size() != rv.size())
        fail("rank " + str(a) + " sends " + str(static_cast<int>(sd.size())) + " messages to rank " + str(b) +
             " which posts " + str(static_cast<int>(rv.size())) + " receives");
      for (size_t k = 0; k < sd.size(); ++k)
        if (sd[k].mb != rv[k].mb || sd[k].stage != rv[k].stage || sd[k].grad != rv[k].grad)
          fail("message " + std::to_string(k) + " from rank " + str(a) + " to rank " + str(b) + " is (mb " +
               str(sd[k].mb) + ", stage " + str(sd[k].stage) + ") but the receive expects (mb " + str(rv[k].mb) +
               ", stage " + str(rv[k].stage) + ")");
    }
  // Completeness.
  for (int mb = 0; mb < M; ++mb)
    for (int st = 0; st < S; ++st) {
      const int k = idx(mb, st);
      if (tF[k] < 0 || tB[k] < 0)
        fail("micro-batch " + str(mb) + " stage " + str(st) + " has no " + (tF[k] < 0 ? "F" : "B"));
      if (deferred[k] && tW[k] < 0) fail("micro-batch " + str(mb) + " stage " + str(st) + " deferred W never runs");
    }
  res.makespan = 0.0;
  for (int r = 0; r < P; ++r) res.makespan = std::max(res.makespan, res.finish[r]);
  res.bubble.resize(P);
  for (int r = 0; r < P; ++r) res.bubble[r] = res.makespan - res.busy[r];
  return res;
}

}  // namespace r1engine
