// Minimal assertion helpers for the standalone C++ unit tests (run by ctest, no dependencies), and their random
// inputs.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

inline int& r1_check_failures() {
  static int failures = 0;
  return failures;
}

#define R1_CHECK(cond)                                                        \
  do {                                                                        \
    if (!(cond)) {                                                            \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++r1_check_failures();                                                  \
    }                                                                         \
  } while (0)

#define R1_CHECK_NEAR(a, b, tol)                                                          \
  do {                                                                                    \
    double _a = (a), _b = (b);                                                            \
    if (!(std::fabs(_a - _b) <= (tol) * (1.0 + std::fabs(_b)))) {                         \
      std::fprintf(stderr, "%s:%d: CHECK_NEAR failed: %s=%.9g vs %s=%.9g (tol %g)\n", __FILE__, \
                   __LINE__, #a, _a, #b, _b, (double)(tol));                              \
      ++r1_check_failures();                                                              \
    }                                                                                     \
  } while (0)

// Return value for main(): prints a summary, non-zero on any failure.
inline int r1_check_report(const char* name) {
  if (r1_check_failures() == 0) {
    std::printf("%s: all checks passed\n", name);
    return 0;
  }
  std::fprintf(stderr, "%s: %d check(s) failed\n", name, r1_check_failures());
  return 1;
}

// n draws of Normal(0, scale^2) from rng.
inline std::vector<float> r1_randn(std::mt19937& rng, int64_t n, float scale = 1.0f) {
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& e : x) e = nd(rng);
  return x;
}
