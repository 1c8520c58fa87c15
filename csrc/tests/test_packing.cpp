// Unit tests of the best-fit packing planner (csrc/core/packing.*), no torch.
#include <algorithm>
#include <functional>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/packing.h"
#include "tests/check.h"

using r1engine::PackingCost;
using r1engine::PackingOptions;
using r1engine::PackingResult;
using r1engine::plan_packing;
using r1engine::validate_packing;

namespace {

PackingOptions opts(int64_t chunk_len, int64_t ranks, PackingCost cost = PackingCost::kTokens, int64_t min_chunks = 1,
                    int64_t multiple = 1) {
  PackingOptions o;
  o.chunk_len = chunk_len;
  o.num_ranks = ranks;
  o.cost = cost;
  o.attn_coef = 64.0;
  o.min_chunks_per_rank = min_chunks;
  o.chunk_multiple = multiple;
  return o;
}

bool throws_with(const std::vector<int64_t>& lens, const PackingOptions& o, const std::string& needle) {
  try {
    plan_packing(lens.data(), static_cast<int64_t>(lens.size()), o);
  } catch (const std::invalid_argument& e) {
    return std::string(e.what()).find(needle) != std::string::npos;
  }
  return false;
}

double ratio(const PackingResult& r) {
  auto [mn, mx] = std::minmax_element(r.rank_load.begin(), r.rank_load.end());
  return *mx / *mn;
}

void test_exact_fit() {
  // 6 + 4, 7 + 3, 5 + 5 fit exactly into 3 chunks of 10; BFD must find it.
  std::vector<int64_t> lens = {6, 4, 7, 3, 5, 5};
  auto o = opts(10, 1);
  auto r = plan_packing(lens.data(), 6, o);
  R1_CHECK(validate_packing(lens.data(), 6, o, r).empty());
  R1_CHECK(r.lower_bound == 3);
  R1_CHECK(r.chunk_ptr.size() == 4);
  for (int64_t t : r.chunk_tokens) R1_CHECK(t == 10);
}

void test_best_fit_choice() {
  // Sorted: 8, 7, 3, 2. Best fit puts 3 with 7 (free 3), 2 with 8 (free 2): 2 chunks, both full.
  std::vector<int64_t> lens = {2, 8, 3, 7};
  auto o = opts(10, 1);
  auto r = plan_packing(lens.data(), 4, o);
  R1_CHECK(validate_packing(lens.data(), 4, o, r).empty());
  R1_CHECK(r.chunk_tokens.size() == 2);
  R1_CHECK(r.chunk_tokens[0] == 10 && r.chunk_tokens[1] == 10);
}

void test_equal_counts_and_split() {
  // 5 chunks' worth of full sequences across 4 ranks -> 8 chunks, created by splitting, none empty.
  std::vector<int64_t> lens;
  for (int i = 0; i < 20; ++i) lens.push_back(25);
  auto o = opts(100, 4);
  auto r = plan_packing(lens.data(), static_cast<int64_t>(lens.size()), o);
  R1_CHECK(validate_packing(lens.data(), static_cast<int64_t>(lens.size()), o, r).empty());
  R1_CHECK(r.bfd_chunks == 5);
  R1_CHECK(r.chunk_tokens.size() == 8);
  for (int64_t t : r.chunk_tokens) R1_CHECK(t > 0);
  R1_CHECK(ratio(r) <= 1.0 + 1e-12);  // 500 tokens over 4 ranks: 125 each is reachable with 25-token pieces
}

void test_min_chunks_and_multiple() {
  std::vector<int64_t> lens = {3, 9, 4, 1, 7, 7, 2, 8, 5};
  auto o = opts(16, 2, PackingCost::kTokens, 3, 2);  // >= 3 per rank, multiple of 2 -> 4 per rank
  auto r = plan_packing(lens.data(), 9, o);
  R1_CHECK(validate_packing(lens.data(), 9, o, r).empty());
  R1_CHECK(r.rank_ptr[1] == 4 && r.rank_ptr[2] == 8);
  // 9 sequences for 8 chunks: no chunk may be empty
  for (int64_t t : r.chunk_tokens) R1_CHECK(t > 0);
}

void test_more_chunks_than_sequences() {
  std::vector<int64_t> lens = {5, 6};
  auto o = opts(16, 3);
  auto r = plan_packing(lens.data(), 2, o);
  R1_CHECK(validate_packing(lens.data(), 2, o, r).empty());
  R1_CHECK(r.chunk_tokens.size() == 3);
  int empties = 0;
  for (int64_t t : r.chunk_tokens) empties += (t == 0);
  R1_CHECK(empties == 1);
}

void test_errors() {
  R1_CHECK(throws_with({3, 17, 2}, opts(16, 1), "lengths[1] = 17"));
  R1_CHECK(throws_with({3, 0, 2}, opts(16, 1), "lengths[1] = 0"));
  R1_CHECK(throws_with({3, 4, -2}, opts(16, 1), "lengths[2] = -2"));
  R1_CHECK(throws_with({3}, opts(0, 1), "chunk_len"));
  R1_CHECK(throws_with({3}, opts(16, 0), "num_ranks"));
  R1_CHECK(throws_with({3}, opts(16, 1, PackingCost::kTokens, -1), "min_chunks_per_rank"));
  R1_CHECK(throws_with({3}, opts(16, 1, PackingCost::kTokens, 1, 0), "chunk_multiple"));
}

void test_random_invariants_and_quality() {
  std::mt19937_64 rng(1234);
  std::lognormal_distribution<double> logn(6.5, 1.0);
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t cap = 1024 + 97 * trial;
    const int64_t n = 200 + 131 * trial;
    const int64_t R = 1 + trial % 8;
    std::vector<int64_t> lens(static_cast<size_t>(n));
    for (auto& l : lens) l = std::clamp<int64_t>(static_cast<int64_t>(logn(rng)), 1, cap);
    for (PackingCost c : {PackingCost::kTokens, PackingCost::kAttention}) {
      auto o = opts(cap, R, c, 1 + trial % 3, 1 + trial % 2);
      auto r = plan_packing(lens.data(), n, o);
      const std::string err = validate_packing(lens.data(), n, o, r);
      R1_CHECK(err.empty());
      if (!err.empty()) std::fprintf(stderr, "trial %d: %s\n", trial, err.c_str());
      R1_CHECK(static_cast<int64_t>(r.chunk_tokens.size()) >= r.lower_bound);
      // BFD on this long-tailed mix is within 2% (+1) of the lower bound.
      R1_CHECK(r.bfd_chunks <= r.lower_bound * 102 / 100 + 1);
      // Determinism.
      auto r2 = plan_packing(lens.data(), n, o);
      R1_CHECK(r2.seq_index == r.seq_index && r2.seq_offset == r.seq_offset && r2.rank_ptr == r.rank_ptr);
      if (c == PackingCost::kTokens && r.chunk_tokens.size() >= static_cast<size_t>(4 * R)) R1_CHECK(ratio(r) <= 1.02);
    }
  }
}

// O(n * chunks) best-fit decreasing, written independently as the oracle for the chunk count.
int64_t brute_force_bfd(std::vector<int64_t> lens, int64_t cap) {
  std::stable_sort(lens.begin(), lens.end(), std::greater<int64_t>());
  std::vector<int64_t> free_space;
  for (int64_t len : lens) {
    int64_t best = -1;
    for (size_t c = 0; c < free_space.size(); ++c)
      if (free_space[c] >= len && (best < 0 || free_space[c] < free_space[static_cast<size_t>(best)]))
        best = static_cast<int64_t>(c);
    if (best < 0) {
      free_space.push_back(cap - len);
    } else {
      free_space[static_cast<size_t>(best)] -= len;
    }
  }
  return static_cast<int64_t>(free_space.size());
}

void test_matches_brute_force_small_and_huge_chunk_len() {
  std::mt19937_64 rng(99);
  // small chunk_len: bucket + bit-tree path; huge chunk_len: balanced-tree path
  for (int64_t cap : {int64_t{1}, int64_t{7}, int64_t{64}, int64_t{65}, int64_t{4097}, int64_t{50'000'000}}) {
    for (int trial = 0; trial < 5; ++trial) {
      std::uniform_int_distribution<int64_t> d(1, cap);
      std::vector<int64_t> lens(static_cast<size_t>(30 + 37 * trial));
      for (auto& l : lens) l = std::max<int64_t>(1, d(rng) / (1 + trial % 3));
      auto o = opts(cap, 1);
      auto r = plan_packing(lens.data(), static_cast<int64_t>(lens.size()), o);
      R1_CHECK(validate_packing(lens.data(), static_cast<int64_t>(lens.size()), o, r).empty());
      R1_CHECK(r.bfd_chunks == brute_force_bfd(lens, cap));
    }
  }
}

}  // namespace

int main() {
  test_matches_brute_force_small_and_huge_chunk_len();
  test_exact_fit();
  test_best_fit_choice();
  test_equal_counts_and_split();
  test_min_chunks_and_multiple();
  test_more_chunks_than_sequences();
  test_errors();
  test_random_invariants_and_quality();
  return r1_check_report("test_packing");
}
