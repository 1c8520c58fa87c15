// Best-fit-decreasing chunk packing with equal chunk counts per rank; see packing.h.
#include "core/packing.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <numeric>
#include <queue>
#include <set>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <utility>

namespace r1engine {

namespace {

// 64-ary bit tree over [0, size): set/clear a position and find the smallest set position >= x,
// each in O(log_64 size).
class NextSetBit {
 public:
  explicit NextSetBit(int64_t size) {
    int64_t n = std::max<int64_t>(size, 1);
    do {
      n = (n + 63) / 64;
      levels_.emplace_back(static_cast<size_t>(n), 0);
    } while (n > 1);
  }

  void set(int64_t i) {
    for (auto& words : levels_) {
      uint64_t& w = words[static_cast<size_t>(i >> 6)];
      const bool was_empty = (w == 0);
      w |= uint64_t{1} << (i & 63);
      if (!was_empty) return;
      i >>= 6;
    }
  }

  void clear(int64_t i) {
    for (auto& words : levels_) {
      uint64_t& w = words[static_cast<size_t>(i >> 6)];
      w &= ~(uint64_t{1} << (i & 63));
      if (w != 0) return;
      i >>= 6;
    }
  }

  // Smallest set position >= x, or -1.
  int64_t find_next(int64_t x) const {
    size_t level = 0;
    int64_t i = x;
    // Climb until a word holds a set bit at or after position i.
    while (true) {
      if (level >= levels_.size()) return -1;
      const auto& words = levels_[level];
      const int64_t wi = i >> 6;
      if (wi >= static_cast<int64_t>(words.size())) return -1;
      const uint64_t bits = (i & 63) == 0 ? words[wi] : (words[wi] & (~uint64_t{0} << (i & 63)));
      if (bits != 0) {
        i = (wi << 6) + std::countr_zero(bits);
        break;
      }
      i = wi + 1;  // the next word at this level is the next bit one level up
      ++level;
    }
    // Descend taking the lowest set bit.
    while (level > 0) {
      --level;
      i = (i << 6) + std::countr_zero(levels_[level][static_cast<size_t>(i)]);
    }
    return i;
  }

 private:
  std::vector<std::vector<uint64_t>> levels_;  // levels_[0] is the finest
};

struct Item {
  int64_t len;  // kept next to the index so that later passes never gather from `lengths`
  int64_t seq;
};

struct Chunk {
  std::vector<Item> seqs;  // sequences, in placement order
  int64_t tokens = 0;
  double cost = 0.0;
};

std::string describe_index(int64_t i, int64_t len) {
  std::ostringstream os;
  os << "lengths[" << i << "] = " << len;
  return os.str();
}

void validate_options(const int64_t* lengths, int64_t n, const PackingOptions& o) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument(msg); };
  if (n < 0) fail("plan_packing: number of sequences must be >= 0, got " + std::to_string(n));
  if (n > 0 && lengths == nullptr) fail("plan_packing: lengths is null");
  if (o.chunk_len <= 0) fail("plan_packing: chunk_len must be > 0, got " + std::to_string(o.chunk_len));
  if (o.num_ranks <= 0) fail("plan_packing: num_ranks must be > 0, got " + std::to_string(o.num_ranks));
  if (o.min_chunks_per_rank < 0)
    fail("plan_packing: min_chunks_per_rank must be >= 0, got " + std::to_string(o.min_chunks_per_rank));
  if (o.chunk_multiple <= 0)
    fail("plan_packing: chunk_multiple must be > 0, got " + std::to_string(o.chunk_multiple));
  if (!(o.attn_coef >= 0.0) || !std::isfinite(o.attn_coef))
    fail("plan_packing: attn_coef must be a finite value >= 0, got " + std::to_string(o.attn_coef));
  if (o.cost != PackingCost::kTokens && o.cost != PackingCost::kAttention) fail("plan_packing: unknown cost kind");
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = lengths[i];
    if (len <= 0) fail("plan_packing: every length must be > 0, but " + describe_index(i, len));
    if (len > o.chunk_len)
      fail("plan_packing: sequence longer than chunk_len = " + std::to_string(o.chunk_len) + ": " +
           describe_index(i, len));
  }
}

// Indices sorted by length descending, ties by ascending index (stable counting sort when the range is small),
// plus the sorted lengths themselves (so later passes read them sequentially instead of gathering).
std::vector<int64_t> sort_desc(const int64_t* lengths, int64_t n, int64_t max_len, std::vector<int64_t>& sorted_len) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  sorted_len.resize(static_cast<size_t>(n));
  if (max_len <= 4 * n + (int64_t{1} << 16)) {
    std::vector<int64_t> start(static_cast<size_t>(max_len + 2), 0);
    // bucket k holds length max_len - k (so ascending bucket = descending length)
    for (int64_t i = 0; i < n; ++i) ++start[static_cast<size_t>(max_len - lengths[i] + 1)];
    for (size_t k = 1; k < start.size(); ++k) start[k] += start[k - 1];
    for (int64_t k = 0; k <= max_len; ++k)
      std::fill(sorted_len.begin() + start[static_cast<size_t>(k)], sorted_len.begin() + start[static_cast<size_t>(k + 1)],
                max_len - k);
    for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(start[static_cast<size_t>(max_len - lengths[i])]++)] = i;
  } else {
    std::iota(order.begin(), order.end(), int64_t{0});
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
    for (int64_t k = 0; k < n; ++k) sorted_len[static_cast<size_t>(k)] = lengths[order[static_cast<size_t>(k)]];
  }
  return order;
}

// Best-fit decreasing with free-space buckets and the 64-ary bit tree (chunk_len + 1 buckets).
int64_t best_fit_buckets(const std::vector<int64_t>& sorted_len, int64_t cap, std::vector<int64_t>& chunk_of) {
  NextSetBit nonempty(cap + 1);                                 // free-space values with an open chunk
  std::vector<int64_t> head(static_cast<size_t>(cap + 1), -1);  // free space -> first chunk (intrusive list)
  std::vector<int64_t> next;                                    // chunk -> next chunk in its bucket
  std::vector<int64_t> free_space;
  for (size_t k = 0; k < sorted_len.size(); ++k) {
    const int64_t len = sorted_len[k];
    const int64_t f = nonempty.find_next(len);
    int64_t c;
    if (f < 0) {
      c = static_cast<int64_t>(free_space.size());
      next.push_back(-1);
      free_space.push_back(cap);
    } else {
      c = head[static_cast<size_t>(f)];
      head[static_cast<size_t>(f)] = next[static_cast<size_t>(c)];
      if (head[static_cast<size_t>(f)] < 0) nonempty.clear(f);
    }
    chunk_of[k] = c;
    const int64_t nf = free_space[static_cast<size_t>(c)] - len;
    free_space[static_cast<size_t>(c)] = nf;
    if (nf > 0) {
      next[static_cast<size_t>(c)] = head[static_cast<size_t>(nf)];
      if (head[static_cast<size_t>(nf)] < 0) nonempty.set(nf);
      head[static_cast<size_t>(nf)] = c;
    }
  }
  return static_cast<int64_t>(free_space.size());
}

// Chunk id per placed sequence (in `order` order) for best-fit decreasing with a balanced tree keyed by
// (free space, chunk id): used when chunk_len is so large that per-free-space buckets would waste memory.
int64_t best_fit_tree(const std::vector<int64_t>& sorted_len, int64_t cap, std::vector<int64_t>& chunk_of) {
  std::set<std::pair<int64_t, int64_t>> open;  // (free space, chunk)
  int64_t num_chunks = 0;
  for (size_t k = 0; k < sorted_len.size(); ++k) {
    const int64_t len = sorted_len[k];
    auto it = open.lower_bound({len, int64_t{-1}});
    int64_t c, free_space;
    if (it == open.end()) {
      c = num_chunks++;
      free_space = cap;
    } else {
      free_space = it->first;
      c = it->second;
      open.erase(it);
    }
    chunk_of[k] = c;
    if (free_space - len > 0) open.emplace(free_space - len, c);
  }
  return num_chunks;
}

// Best-fit decreasing over `order`. Returns chunks in the order they were opened, each listing its sequences
// in placement order. The pass records only a chunk id per sequence; the per-chunk lists are built afterwards
// with exact sizes (no reallocation in the hot loop).
std::vector<Chunk> best_fit_decreasing(const std::vector<int64_t>& sorted_len, const std::vector<int64_t>& order,
                                       int64_t cap, PackingCost cost, double a) {
  std::vector<int64_t> chunk_of(order.size());
  int64_t num_chunks = 0;
  if (cap > 4 * static_cast<int64_t>(order.size()) + (int64_t{1} << 22)) {
    num_chunks = best_fit_tree(sorted_len, cap, chunk_of);
  } else {
    num_chunks = best_fit_buckets(sorted_len, cap, chunk_of);
  }
  std::vector<Chunk> chunks(static_cast<size_t>(num_chunks));
  std::vector<int64_t> count(static_cast<size_t>(num_chunks), 0);
  for (int64_t c : chunk_of) ++count[static_cast<size_t>(c)];
  for (size_t c = 0; c < chunks.size(); ++c) chunks[c].seqs.reserve(static_cast<size_t>(count[c]));
  for (size_t k = 0; k < order.size(); ++k) {
    Chunk& ch = chunks[static_cast<size_t>(chunk_of[k])];
    ch.seqs.push_back({sorted_len[k], order[k]});
    ch.tokens += sorted_len[k];
    ch.cost += sequence_cost(sorted_len[k], cost, a);
  }
  return chunks;
}

// Split the most expensive multi-sequence chunks until there are `target` chunks (empty chunks only when no
// chunk holds two sequences any more).
void split_to_count(std::vector<Chunk>& chunks, int64_t target, PackingCost cost, double a) {
  using HeapEntry = std::tuple<double, int64_t, int64_t>;  // (cost, -index, index): max cost, then lowest index
  std::priority_queue<HeapEntry> heap;
  for (int64_t c = 0; c < static_cast<int64_t>(chunks.size()); ++c)
    if (chunks[static_cast<size_t>(c)].seqs.size() >= 2) heap.emplace(chunks[static_cast<size_t>(c)].cost, -c, c);
  while (static_cast<int64_t>(chunks.size()) < target) {
    if (heap.empty()) {
      chunks.emplace_back();  // fewer sequences than required chunks: an all-padding chunk is unavoidable
      continue;
    }
    const int64_t c = std::get<2>(heap.top());
    heap.pop();
    std::vector<Item> seqs = std::move(chunks[static_cast<size_t>(c)].seqs);
    // Sequences are in non-increasing length order: greedily give each to the cheaper half.
    Chunk left, right;
    for (const Item& it : seqs) {
      Chunk& dst = (left.cost <= right.cost) ? left : right;
      dst.seqs.push_back(it);
      dst.tokens += it.len;
      dst.cost += sequence_cost(it.len, cost, a);
    }
    chunks[static_cast<size_t>(c)] = std::move(left);
    const int64_t d = static_cast<int64_t>(chunks.size());
    chunks.push_back(std::move(right));
    for (int64_t x : {c, d})
      if (chunks[static_cast<size_t>(x)].seqs.size() >= 2) heap.emplace(chunks[static_cast<size_t>(x)].cost, -x, x);
  }
}

struct RankState {
  std::vector<std::vector<int64_t>> chunks;  // chunk ids per rank
  std::vector<double> load;
};

// Cardinality-constrained LPT: chunks by cost descending, each to the least-loaded rank with a free slot.
RankState assign_lpt(const std::vector<Chunk>& chunks, int64_t R, int64_t K) {
  RankState st;
  st.chunks.assign(static_cast<size_t>(R), {});
  st.load.assign(static_cast<size_t>(R), 0.0);
  std::vector<std::pair<double, int64_t>> ids(chunks.size());  // (-cost, chunk): heaviest first, ties by id
  for (size_t c = 0; c < chunks.size(); ++c) ids[c] = {-chunks[c].cost, static_cast<int64_t>(c)};
  std::sort(ids.begin(), ids.end());
  using RankEntry = std::pair<double, int64_t>;  // (load, rank), min-heap
  std::priority_queue<RankEntry, std::vector<RankEntry>, std::greater<RankEntry>> heap;
  for (int64_t r = 0; r < R; ++r) heap.emplace(0.0, r);
  for (const auto& [neg_cost, c] : ids) {
    auto [load, r] = heap.top();
    heap.pop();
    st.chunks[static_cast<size_t>(r)].push_back(c);
    st.load[static_cast<size_t>(r)] = load + chunks[static_cast<size_t>(c)].cost;
    if (static_cast<int64_t>(st.chunks[static_cast<size_t>(r)].size()) < K)
      heap.emplace(st.load[static_cast<size_t>(r)], r);
  }
  return st;
}

using CostList = std::vector<std::pair<double, int64_t>>;  // (chunk cost, chunk id), sorted ascending

// Best chunk swap between heavy rank h and light rank l: delta = cost(x) - cost(y) in (0, gap), closest to
// gap / 2, found by a two-pointer walk over both sorted lists in O(K). Returns false when no swap lowers the
// pair's maximum.
bool swap_chunks(RankState& st, std::vector<CostList>& sorted, int64_t h, int64_t l) {
  const double gap = st.load[static_cast<size_t>(h)] - st.load[static_cast<size_t>(l)];
  if (!(gap > 0)) return false;
  CostList& H = sorted[static_cast<size_t>(h)];
  CostList& L = sorted[static_cast<size_t>(l)];
  if (H.empty() || L.empty()) return false;
  double best = gap;  // |gap - 2 delta| must get below gap for a strict improvement
  size_t bi = 0, bj = 0;
  bool found = false;
  size_t j = 0;
  for (size_t i = 0; i < H.size(); ++i) {
    const double want = H[i].first - gap / 2;  // ideal cost of the chunk coming back; ascending in i
    while (j < L.size() && L[j].first < want) ++j;
    for (size_t jj : {j, j - 1}) {
      if (jj >= L.size()) continue;  // also catches j - 1 wrapping when j == 0
      const double delta = H[i].first - L[jj].first;
      if (!(delta > 0 && delta < gap)) continue;
      const double score = std::fabs(gap - 2 * delta);
      if (score < best - 1e-12 * gap) {
        best = score;
        bi = i;
        bj = jj;
        found = true;
      }
    }
  }
  if (!found) return false;
  const auto x = H[bi], y = L[bj];
  const double delta = x.first - y.first;
  H.erase(H.begin() + static_cast<std::ptrdiff_t>(bi));
  L.erase(L.begin() + static_cast<std::ptrdiff_t>(bj));
  H.insert(std::lower_bound(H.begin(), H.end(), y), y);
  L.insert(std::lower_bound(L.begin(), L.end(), x), x);
  st.load[static_cast<size_t>(h)] -= delta;
  st.load[static_cast<size_t>(l)] += delta;
  return true;
}

std::pair<int64_t, int64_t> argmax_argmin(const std::vector<double>& v) {
  int64_t hi = 0, lo = 0;
  for (int64_t r = 1; r < static_cast<int64_t>(v.size()); ++r) {
    if (v[static_cast<size_t>(r)] > v[static_cast<size_t>(hi)]) hi = r;
    if (v[static_cast<size_t>(r)] < v[static_cast<size_t>(lo)]) lo = r;
  }
  return {hi, lo};
}

// Pairwise chunk swaps: the heaviest rank against the lightest few ranks that admit an improving swap, then
// the lightest against the heaviest few, until neither improves, the spread is below tol, or the cap is hit.
void refine_chunk_swaps(RankState& st, const std::vector<Chunk>& chunks, int64_t iters, double tol) {
  const int64_t R = static_cast<int64_t>(st.load.size());
  if (R < 2) return;
  std::vector<CostList> sorted(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c : st.chunks[static_cast<size_t>(r)])
      sorted[static_cast<size_t>(r)].emplace_back(chunks[static_cast<size_t>(c)].cost, c);
    std::sort(sorted[static_cast<size_t>(r)].begin(), sorted[static_cast<size_t>(r)].end());
  }
  const int64_t partners = std::min<int64_t>(R - 1, 8);
  std::vector<int64_t> by_load(static_cast<size_t>(R));
  for (int64_t it = 0; it < iters; ++it) {
    std::iota(by_load.begin(), by_load.end(), int64_t{0});
    std::stable_sort(by_load.begin(), by_load.end(), [&](int64_t x, int64_t y) {
      return st.load[static_cast<size_t>(x)] < st.load[static_cast<size_t>(y)];
    });
    const int64_t hi = by_load.back(), lo = by_load.front();
    if (!(st.load[static_cast<size_t>(hi)] - st.load[static_cast<size_t>(lo)] > tol * st.load[static_cast<size_t>(hi)]))
      break;
    bool moved = false;
    for (int64_t k = 0; k < partners && !moved; ++k) moved = swap_chunks(st, sorted, hi, by_load[static_cast<size_t>(k)]);
    for (int64_t k = R - 1; k >= R - partners && !moved; --k)
      moved = swap_chunks(st, sorted, by_load[static_cast<size_t>(k)], lo);
    if (!moved) break;
  }
  for (int64_t r = 0; r < R; ++r) {
    auto& ids = st.chunks[static_cast<size_t>(r)];
    ids.clear();
    for (const auto& e : sorted[static_cast<size_t>(r)]) ids.push_back(e.second);
  }
}

// Sequence-level refinement between the heaviest and the lightest rank: move one sequence into a chunk with
// room, or swap two sequences whose chunks can absorb the length difference, with the cost transfer closest
// to half the gap. Never empties a chunk.
void refine_sequence_moves(RankState& st, std::vector<Chunk>& chunks, int64_t cap,
                           PackingCost cost, double a, int64_t iters, double tol, int64_t work_budget) {
  const int64_t R = static_cast<int64_t>(st.load.size());
  if (R < 2) return;
  struct Entry {
    double cost;
    int64_t len;
    int64_t chunk;
    size_t pos;
  };
  for (int64_t it = 0; it < iters; ++it) {
    auto [hi, lo] = argmax_argmin(st.load);
    const double gap = st.load[static_cast<size_t>(hi)] - st.load[static_cast<size_t>(lo)];
    if (!(gap > tol * st.load[static_cast<size_t>(hi)])) return;
    for (int64_t r : {hi, lo})
      for (int64_t c : st.chunks[static_cast<size_t>(r)])
        work_budget -= static_cast<int64_t>(chunks[static_cast<size_t>(c)].seqs.size()) + 1;
    if (work_budget < 0) return;
    // Light rank: its sequences sorted by cost, and its chunk free spaces sorted.
    std::vector<Entry> light;
    std::vector<std::pair<int64_t, int64_t>> free_lo;  // (free space, chunk)
    for (int64_t c : st.chunks[static_cast<size_t>(lo)]) {
      const Chunk& ch = chunks[static_cast<size_t>(c)];
      free_lo.emplace_back(cap - ch.tokens, c);
      for (size_t p = 0; p < ch.seqs.size(); ++p) {
        const int64_t len = ch.seqs[p].len;
        light.push_back({sequence_cost(len, cost, a), len, c, p});
      }
    }
    std::sort(light.begin(), light.end(), [](const Entry& x, const Entry& y) {
      return std::tie(x.cost, x.chunk, x.pos) < std::tie(y.cost, y.chunk, y.pos);
    });
    std::sort(free_lo.begin(), free_lo.end());
    double best = gap;
    // action: kind 0 = move (hi chunk hc, pos hp) -> lo chunk lc; kind 1 = swap with (lc, lp)
    int kind = -1;
    int64_t bhc = -1, blc = -1;
    size_t bhp = 0, blp = 0;
    for (int64_t hc : st.chunks[static_cast<size_t>(hi)]) {
      const Chunk& ch = chunks[static_cast<size_t>(hc)];
      const int64_t free_h = cap - ch.tokens;
      for (size_t hp = 0; hp < ch.seqs.size(); ++hp) {
        const int64_t len = ch.seqs[hp].len;
        const double cs = sequence_cost(len, cost, a);
        // Move: needs a light chunk with free >= len (best fit: smallest such), and must not empty hc.
        if (ch.seqs.size() >= 2 && cs < gap) {
          const double score = std::fabs(gap - 2 * cs);
          if (score < best - 1e-12 * gap) {
            auto ft = std::lower_bound(free_lo.begin(), free_lo.end(), std::make_pair(len, int64_t{-1}));
            if (ft != free_lo.end()) {
              best = score;
              kind = 0;
              bhc = hc;
              bhp = hp;
              blc = ft->second;
            }
          }
        }
        // Swap with a light sequence of cost near cs - gap/2 (scan a few neighbours for capacity).
        const double want = cs - gap / 2;
        auto it0 = std::lower_bound(light.begin(), light.end(), want,
                                    [](const Entry& e, double v) { return e.cost < v; });
        const auto base = it0 - light.begin();
        for (int64_t off = -3; off <= 3; ++off) {
          const auto j = base + off;
          if (j < 0 || j >= static_cast<int64_t>(light.size())) continue;
          const Entry& e = light[static_cast<size_t>(j)];
          const double delta = cs - e.cost;
          if (!(delta > 0 && delta < gap)) continue;
          const double score = std::fabs(gap - 2 * delta);
          if (!(score < best - 1e-12 * gap)) continue;
          const int64_t free_l = cap - chunks[static_cast<size_t>(e.chunk)].tokens;
          if (len - e.len > free_l || e.len - len > free_h) continue;
          best = score;
          kind = 1;
          bhc = hc;
          bhp = hp;
          blc = e.chunk;
          blp = e.pos;
        }
      }
    }
    if (kind < 0) return;
    Chunk& H = chunks[static_cast<size_t>(bhc)];
    Chunk& L = chunks[static_cast<size_t>(blc)];
    const Item s = H.seqs[bhp];
    const double cs = sequence_cost(s.len, cost, a);
    if (kind == 0) {
      H.seqs.erase(H.seqs.begin() + static_cast<std::ptrdiff_t>(bhp));
      H.tokens -= s.len;
      H.cost -= cs;
      L.seqs.push_back(s);
      L.tokens += s.len;
      L.cost += cs;
      st.load[static_cast<size_t>(hi)] -= cs;
      st.load[static_cast<size_t>(lo)] += cs;
    } else {
      const Item t = L.seqs[blp];
      const double ct = sequence_cost(t.len, cost, a);
      H.seqs[bhp] = t;
      L.seqs[blp] = s;
      H.tokens += t.len - s.len;
      L.tokens += s.len - t.len;
      H.cost += ct - cs;
      L.cost += cs - ct;
      st.load[static_cast<size_t>(hi)] += ct - cs;
      st.load[static_cast<size_t>(lo)] += cs - ct;
    }
  }
}

// Levelling by whole sequences, for the loads that chunk swaps cannot even out: few chunks per rank, each
// holding many short sequences, so that rank loads are sums of a few large chunk costs (best fit fills chunks
// to capacity and the count adjustment halves some of them, so the loads are quantised in steps of about half
// a chunk). Runs only while the max - min spread exceeds `tol` of the maximum. Every rank above the mean load
// gives up sequences whose cost stays within its remaining excess, most expensive first (greedy subset sum),
// never emptying a chunk. The pool is dealt most expensive first to the rank with the largest remaining
// deficit (ties: lowest rank), into that rank's chunk with the most free space (ties: lowest chunk id), and
// only while that deficit is at least half the sequence's cost; at most 4 light ranks are tried per sequence,
// and one that none of them has room for stays where it was. No rank ends above the old maximum or below the
// old minimum. O(m log m) in the m sequences of the ranks above the mean.
void level_sequences(RankState& st, std::vector<Chunk>& chunks, int64_t cap, PackingCost cost, double a,
                     double tol) {
  const int64_t R = static_cast<int64_t>(st.load.size());
  if (R < 2) return;
  const auto [hi, lo] = argmax_argmin(st.load);
  if (!(st.load[static_cast<size_t>(hi)] - st.load[static_cast<size_t>(lo)] > tol * st.load[static_cast<size_t>(hi)]))
    return;
  const double mean = std::accumulate(st.load.begin(), st.load.end(), 0.0) / static_cast<double>(R);
  struct Cand {
    int64_t len;
    int64_t chunk;
    size_t pos;
    int64_t rank;
  };
  std::vector<Cand> pool;
  std::vector<int64_t> keep(chunks.size(), 0);  // sequences still in each chunk of a rank above the mean
  std::vector<Cand> own;
  for (int64_t r = 0; r < R; ++r) {
    double excess = st.load[static_cast<size_t>(r)] - mean;
    if (!(excess > 0)) continue;
    own.clear();
    for (int64_t c : st.chunks[static_cast<size_t>(r)]) {
      const auto& seqs = chunks[static_cast<size_t>(c)].seqs;
      keep[static_cast<size_t>(c)] = static_cast<int64_t>(seqs.size());
      for (size_t p = 0; p < seqs.size(); ++p) own.push_back({seqs[p].len, c, p, r});
    }
    std::sort(own.begin(), own.end(), [](const Cand& x, const Cand& y) {
      return std::tie(x.len, x.chunk, x.pos) < std::tie(y.len, y.chunk, y.pos);
    });
    // Greedy subset sum: the most expensive sequences that still fit under the remaining excess first, so
    // that a few cheap ones are left to fill the remainder.
    const double cheapest = own.empty() ? 0.0 : sequence_cost(own.front().len, cost, a);
    for (auto it = own.rbegin(); it != own.rend() && excess >= cheapest; ++it) {
      const double cs = sequence_cost(it->len, cost, a);
      if (cs > excess || keep[static_cast<size_t>(it->chunk)] < 2) continue;
      --keep[static_cast<size_t>(it->chunk)];
      excess -= cs;
      pool.push_back(*it);
    }
  }
  if (pool.empty()) return;
  std::stable_sort(pool.begin(), pool.end(), [](const Cand& x, const Cand& y) { return x.len > y.len; });

  // Ranks below the mean: a max-heap on the remaining deficit (ties: lowest rank), and per rank a max-heap of
  // its chunks' free space (ties: lowest chunk id).
  std::priority_queue<std::pair<double, int64_t>> need;  // (deficit, -rank)
  std::vector<std::priority_queue<std::pair<int64_t, int64_t>>> room(static_cast<size_t>(R));  // (free, -chunk)
  for (int64_t r = 0; r < R; ++r) {
    const double deficit = mean - st.load[static_cast<size_t>(r)];
    if (!(deficit > 0)) continue;
    need.emplace(deficit, -r);
    for (int64_t c : st.chunks[static_cast<size_t>(r)]) {
      const int64_t free_space = cap - chunks[static_cast<size_t>(c)].tokens;
      if (free_space > 0) room[static_cast<size_t>(r)].emplace(free_space, -c);
    }
  }
  constexpr int kTries = 4;  // light ranks tried per sequence, largest deficit first
  std::vector<std::pair<double, int64_t>> tried;
  std::vector<int64_t> touched;
  for (const Cand& e : pool) {
    const double cs = sequence_cost(e.len, cost, a);
    tried.clear();
    int64_t dst = -1, dst_rank = -1;
    while (static_cast<int>(tried.size()) < kTries && !need.empty() && need.top().first >= cs / 2) {
      tried.push_back(need.top());
      need.pop();
      const int64_t r = -tried.back().second;
      auto& q = room[static_cast<size_t>(r)];
      if (q.empty() || q.top().first < e.len) continue;
      const auto [free_space, neg_c] = q.top();
      q.pop();
      if (free_space > e.len) q.emplace(free_space - e.len, neg_c);
      tried.back().first -= cs;
      dst = -neg_c;
      dst_rank = r;
      break;
    }
    for (const auto& t : tried) need.push(t);
    if (dst < 0) continue;
    Chunk& src = chunks[static_cast<size_t>(e.chunk)];
    Chunk& to = chunks[static_cast<size_t>(dst)];
    Item& it = src.seqs[e.pos];
    to.seqs.push_back(it);
    to.tokens += it.len;
    to.cost += cs;
    src.tokens -= it.len;
    src.cost -= cs;
    st.load[static_cast<size_t>(dst_rank)] += cs;
    st.load[static_cast<size_t>(e.rank)] -= cs;
    if (keep[static_cast<size_t>(e.chunk)] >= 0) touched.push_back(e.chunk);
    keep[static_cast<size_t>(e.chunk)] = -1;  // marks the chunk as touched once
    it.len = 0;                               // marks the sequence as moved out
  }
  for (int64_t c : touched) {
    auto& seqs = chunks[static_cast<size_t>(c)].seqs;
    seqs.erase(std::remove_if(seqs.begin(), seqs.end(), [](const Item& x) { return x.len == 0; }), seqs.end());
  }
}

}  // namespace

double sequence_cost(int64_t len, PackingCost cost, double attn_coef) {
  const double l = static_cast<double>(len);
  return cost == PackingCost::kTokens ? l : attn_coef * l + l * l;
}

int64_t target_chunks_per_rank(int64_t num_chunks, const PackingOptions& o) {
  int64_t k = (num_chunks + o.num_ranks - 1) / o.num_ranks;
  k = std::max(k, o.min_chunks_per_rank);
  k = (k + o.chunk_multiple - 1) / o.chunk_multiple * o.chunk_multiple;
  return k;
}

PackingResult plan_packing(const int64_t* lengths, int64_t n, const PackingOptions& opts) {
  validate_options(lengths, n, opts);
  const int64_t cap = opts.chunk_len;
  const int64_t R = opts.num_ranks;
  const double a = opts.attn_coef;

  PackingResult res;
  for (int64_t i = 0; i < n; ++i) res.total_tokens += lengths[i];
  res.lower_bound = (res.total_tokens + cap - 1) / cap;

  std::vector<int64_t> sorted_len;
  const std::vector<int64_t> order = sort_desc(lengths, n, cap, sorted_len);
  std::vector<Chunk> chunks = best_fit_decreasing(sorted_len, order, cap, opts.cost, a);
  res.bfd_chunks = static_cast<int64_t>(chunks.size());
  const int64_t K = target_chunks_per_rank(res.bfd_chunks, opts);
  split_to_count(chunks, K * R, opts.cost, a);

  RankState st = assign_lpt(chunks, R, K);
  const int64_t iters = opts.refine_iters >= 0 ? opts.refine_iters : 4 * R + 64;
  constexpr double kTol = 2e-5;  // stop balancing once (max - min) / max is below this
  refine_chunk_swaps(st, chunks, iters, kTol);
  // Sequence-level moves cost O((n / R) log n) each: they run only while the spread exceeds 1e-3 of the maximum
  // (chunk swaps already got it close) and stop after touching ~4n sequence entries, so each of the (at most
  // two) passes stays O(n log n) overall.
  constexpr double kSeqTol = 1e-3;
  const int64_t seq_iters = opts.refine_iters >= 0 ? opts.refine_iters : iters;
  const int64_t seq_budget = 4 * n + 1024;
  // Each sequence move carries at most one sequence, and the budget affords about seq_budget / (2 (n/R + K))
  // of them (each reads the sequences of two ranks). When even that many moves of the most expensive sequence
  // cannot carry the total excess over the mean load (few chunks per rank, each full of short sequences: the
  // loads are quantised by chunk and chunk swaps cannot even them out), level by whole sequences first.
  const bool level = seq_iters > 0 && n > 0;
  if (level) {
    const double mean = std::accumulate(st.load.begin(), st.load.end(), 0.0) / static_cast<double>(R);
    double excess = 0.0;
    for (double l : st.load) excess += std::max(0.0, l - mean);
    const double moves = static_cast<double>(std::min<int64_t>(seq_iters, seq_budget / (2 * (n / R + K) + 1)));
    if (excess > moves * sequence_cost(sorted_len.front(), opts.cost, a))
      level_sequences(st, chunks, cap, opts.cost, a, kSeqTol);
  }
  refine_sequence_moves(st, chunks, cap, opts.cost, a, seq_iters, kSeqTol, seq_budget);
  // Still above the tolerance: level now, then move single sequences again (each pass only lowers the spread,
  // and both are no-ops within the tolerance).
  if (level) {
    level_sequences(st, chunks, cap, opts.cost, a, kSeqTol);
    refine_sequence_moves(st, chunks, cap, opts.cost, a, seq_iters, kSeqTol, seq_budget);
  }

  // Emit rank-major, chunks within a rank by cost descending (ties by chunk id), sequences by length descending.
  res.rank_ptr.assign(1, 0);
  res.chunk_ptr.assign(1, 0);
  res.seq_index.reserve(static_cast<size_t>(n));
  res.seq_offset.reserve(static_cast<size_t>(n));
  for (int64_t r = 0; r < R; ++r) {
    // Heaviest chunk first (ties: higher chunk id first). refine_chunk_swaps leaves each rank's list sorted by
    // (cost, id) ascending, so this sort only runs when sequence moves changed some costs.
    std::vector<std::pair<double, int64_t>> ids;
    ids.reserve(st.chunks[static_cast<size_t>(r)].size());
    for (int64_t c : st.chunks[static_cast<size_t>(r)]) ids.emplace_back(chunks[static_cast<size_t>(c)].cost, c);
    if (!std::is_sorted(ids.begin(), ids.end())) std::sort(ids.begin(), ids.end());
    double load = 0.0;
    for (auto rit = ids.rbegin(); rit != ids.rend(); ++rit) {
      const int64_t c = rit->second;
      Chunk& ch = chunks[static_cast<size_t>(c)];
      auto longer = [](const Item& x, const Item& y) { return x.len != y.len ? x.len > y.len : x.seq < y.seq; };
      if (!std::is_sorted(ch.seqs.begin(), ch.seqs.end(), longer)) std::sort(ch.seqs.begin(), ch.seqs.end(), longer);
      int64_t off = 0;
      double cost_sum = 0.0;
      for (const Item& it : ch.seqs) {
        res.seq_index.push_back(it.seq);
        res.seq_offset.push_back(off);
        off += it.len;
        cost_sum += sequence_cost(it.len, opts.cost, a);  // recomputed: no drift from incremental updates
      }
      res.chunk_ptr.push_back(static_cast<int64_t>(res.seq_index.size()));
      res.chunk_tokens.push_back(off);
      res.chunk_cost.push_back(cost_sum);
      load += cost_sum;
    }
    res.rank_ptr.push_back(static_cast<int64_t>(res.chunk_tokens.size()));
    res.rank_load.push_back(load);
  }
  return res;
}

std::string validate_packing(const int64_t* lengths, int64_t n, const PackingOptions& o, const PackingResult& r) {
  std::ostringstream err;
  const int64_t C = static_cast<int64_t>(r.chunk_ptr.size()) - 1;
  if (static_cast<int64_t>(r.rank_ptr.size()) != o.num_ranks + 1) return "rank_ptr has the wrong size";
  if (static_cast<int64_t>(r.seq_index.size()) != n || static_cast<int64_t>(r.seq_offset.size()) != n)
    return "seq_index/seq_offset do not hold every sequence";
  if (r.rank_ptr.front() != 0 || r.rank_ptr.back() != C) return "rank_ptr does not cover all chunks";
  const int64_t K = r.rank_ptr[1] - r.rank_ptr[0];
  for (int64_t q = 0; q < o.num_ranks; ++q) {
    if (r.rank_ptr[static_cast<size_t>(q + 1)] - r.rank_ptr[static_cast<size_t>(q)] != K) {
      err << "rank " << q << " has a different number of chunks";
      return err.str();
    }
  }
  if (K < o.min_chunks_per_rank) return "fewer chunks per rank than min_chunks_per_rank";
  if (K % o.chunk_multiple != 0) return "chunks per rank is not a multiple of chunk_multiple";
  std::vector<int> seen(static_cast<size_t>(n), 0);
  for (int64_t c = 0; c < C; ++c) {
    int64_t off = 0;
    for (int64_t p = r.chunk_ptr[static_cast<size_t>(c)]; p < r.chunk_ptr[static_cast<size_t>(c + 1)]; ++p) {
      const int64_t s = r.seq_index[static_cast<size_t>(p)];
      if (s < 0 || s >= n) return "sequence index out of range";
      if (seen[static_cast<size_t>(s)]++) {
        err << "sequence " << s << " placed twice";
        return err.str();
      }
      if (r.seq_offset[static_cast<size_t>(p)] != off) return "offsets are not contiguous";
      off += lengths[s];
    }
    if (off > o.chunk_len) {
      err << "chunk " << c << " holds " << off << " tokens > chunk_len " << o.chunk_len;
      return err.str();
    }
    if (off != r.chunk_tokens[static_cast<size_t>(c)]) return "chunk_tokens mismatch";
  }
  for (int64_t s = 0; s < n; ++s)
    if (!seen[static_cast<size_t>(s)]) {
      err << "sequence " << s << " not placed";
      return err.str();
    }
  return "";
}

}  // namespace r1engine
