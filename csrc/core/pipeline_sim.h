// Discrete-event simulator of a pipeline schedule (see schedule.h).
//
// Every rank executes its op list in order. Compute ops take their cost; a compute op starts when the rank is
// free and all its inputs are there: the producing op on the same rank (it must come earlier in program
// order), or the matching message (SEND time + latency) for a tensor from another rank. SEND is non-blocking
// (buffered, like isend); RECV posts a receive (like irecv) and the consumer waits for it (CommMode::kAsync, what
// the executor does). kBlockingRecv: the RECV itself waits for the message. kSynchronous: blocking RECV and
// rendezvous SEND (a SEND completes only once the receiver has posted the matching RECV), i.e. plain blocking
// send/recv; the schedules emitted here are built for the asynchronous executor and may deadlock under it.
//
// The simulator verifies the schedule and throws std::runtime_error naming the first violation:
//  * every (mb, stage) has exactly one F and one B on the rank and slot that hold the stage, and one W iff
//    its B deferred the weight gradient; B after the F of the same chunk, W after its B;
//  * F of stage s+1 after F of stage s (same micro-batch), B of stage s after B of stage s+1, through a
//    message when the ranks differ, through program order when they are the same rank;
//  * SEND only of a tensor already produced on that rank; the i-th SEND from rank a to rank b matches the
//    i-th RECV posted by b from a (same micro-batch, stage, kind and tag); no message left unmatched;
//  * no deadlock: if every unfinished rank waits for a message that is never sent, it reports the ops.
#pragma once

#include <vector>

#include "core/schedule.h"

namespace r1engine {

struct PipeCosts {
  double f = 1.0;         // forward of one stage chunk
  double b = 2.0;         // FULL backward of one chunk (input + weight gradients), the DualPipe README's B
  double w = 1.0;         // weight-gradient part of b; a deferred B costs b - w and its W costs w
  double fb = -1.0;       // an overlapped F and B pair (F&B); < 0 means f + b (no overlap gain)
  double latency = 0.0;   // time from SEND to the message being available to the receiver
};

struct PipeSimResult {
  double makespan = 0.0;
  std::vector<double> busy;              // per rank: sum of its op costs
  std::vector<double> finish;            // per rank: end time of its last op
  std::vector<double> bubble;            // per rank: makespan - busy
  std::vector<int> peak_activations;     // per rank: max live (mb, stage) chunks, F done .. B done
  std::vector<int> peak_activations_w;   // same, but a deferred chunk stays live until its W is done
  std::vector<std::vector<double>> start, end;  // per rank, per op (comm ops: time they were issued)
};

double op_cost(const PipeOp& op, const PipeCosts& c);

enum class CommMode : int { kAsync = 0, kBlockingRecv = 1, kSynchronous = 2 };

PipeSimResult simulate_schedule(const PipeSchedule& s, const PipeCosts& costs, CommMode mode = CommMode::kAsync);

}  // namespace r1engine
