// Best-fit-decreasing packing of variable-length sequences into fixed-length chunks, with an equal
// number of chunks per data-parallel rank and balanced per-rank load (pure C++, no torch).
//
// Pipeline of plan_packing():
//   1. sort sequences by length, descending (counting sort over [1, chunk_len], stable: ties keep index order);
//   2. best-fit decreasing: each sequence goes into the open chunk with the smallest free space that still
//      fits it. Open chunks are kept in buckets keyed by free space (0..chunk_len) and a 64-ary bit tree
//      over non-empty buckets answers "smallest free space >= len" in O(log_64 chunk_len), so the whole
//      pass is O(n log_64 chunk_len) after the O(n + chunk_len) sort (for a chunk_len far above the number of
//      sequences, a balanced tree over (free space, chunk) and a comparison sort are used instead: O(n log n));
//   3. raise the chunk count to the target (a multiple of num_ranks * chunk_multiple, at least
//      num_ranks * min_chunks_per_rank) by splitting the most expensive multi-sequence chunks in two
//      (whole sequences move; a sequence is never cut). Empty chunks appear only if there are fewer
//      sequences than chunks required;
//   4. assign chunks to ranks, the same count each: cardinality-constrained LPT (most expensive chunk first
//      to the least-loaded rank with room), then pairwise chunk swaps between heavy and light ranks, then
//      levelling by whole sequences (ranks above the mean load hand their cheapest sequences to ranks below
//      it, into chunks with room: this evens out the loads when a few chunks per rank hold many short
//      sequences each, which chunk swaps cannot), then sequence moves/swaps between chunks of the heaviest
//      and lightest rank (within chunk capacity).
// The result is deterministic for a given input.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace r1engine {

enum class PackingCost : int { kTokens = 0, kAttention = 1 };

struct PackingOptions {
  int64_t chunk_len = 0;            // tokens per chunk (> 0)
  int64_t num_ranks = 1;            // data-parallel ranks (> 0)
  PackingCost cost = PackingCost::kTokens;
  double attn_coef = 0.0;           // a in a*len + len^2 (cost == kAttention), >= 0
  int64_t min_chunks_per_rank = 1;  // e.g. 2*PP for a pipeline schedule (>= 0)
  int64_t chunk_multiple = 1;       // chunks per rank must be a multiple of this (> 0)
  int64_t refine_iters = -1;        // cap on balancing iterations; -1 = automatic
};

struct PackingResult {
  // Chunks are numbered rank-major: rank r owns chunks [rank_ptr[r], rank_ptr[r+1]).
  // Chunk c holds sequences seq_index[chunk_ptr[c] .. chunk_ptr[c+1]) placed at token offsets seq_offset[...].
  std::vector<int64_t> seq_index;
  std::vector<int64_t> seq_offset;
  std::vector<int64_t> chunk_ptr;     // size num_chunks + 1
  std::vector<int64_t> rank_ptr;      // size num_ranks + 1
  std::vector<int64_t> chunk_tokens;  // tokens used in each chunk
  std::vector<double> chunk_cost;     // load of each chunk under the chosen cost
  std::vector<double> rank_load;      // sum of chunk_cost per rank
  int64_t total_tokens = 0;
  int64_t lower_bound = 0;            // ceil(total_tokens / chunk_len)
  int64_t bfd_chunks = 0;             // chunks after best-fit decreasing, before the count adjustment
};

// Cost of one sequence of `len` tokens.
double sequence_cost(int64_t len, PackingCost cost, double attn_coef);

// Throws std::invalid_argument (message names the argument / sequence index and length) on bad input.
PackingResult plan_packing(const int64_t* lengths, int64_t n, const PackingOptions& opts);

// Number of chunks per rank that plan_packing() targets for `num_chunks` best-fit chunks.
int64_t target_chunks_per_rank(int64_t num_chunks, const PackingOptions& opts);

// Checks every invariant of a result (each sequence exactly once, capacity, offsets contiguous, equal chunk
// count per rank, loads consistent); returns an empty string if valid, else a description of the violation.
std::string validate_packing(const int64_t* lengths, int64_t n, const PackingOptions& opts, const PackingResult& res);

}  // namespace r1engine
