// The Python extension module r1engine._C. Operators are registered with torch.library
// (TORCH_LIBRARY_FRAGMENT(r1engine, ...)) in the other files of this directory and in csrc/cuda;
// importing this module loads them into torch.ops.r1engine.
#include <torch/extension.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

std::string build_info() {
  std::string info = "cpp=1";
#ifdef _OPENMP
  info += ";openmp=1;omp_max_threads=" + std::to_string(omp_get_max_threads());
#else
  info += ";openmp=0";
#endif
#ifdef R1ENGINE_WITH_CUDA
  info += ";cuda=1";
#else
  info += ";cuda=0";
#endif
#ifdef __AVX512F__
  info += ";simd=avx512";
#elif defined(__AVX2__)
  info += ";simd=avx2";
#else
  info += ";simd=none";
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1engine, m) {
  m.def("build_info() -> str", &build_info);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "r1engine compiled core; operators live in torch.ops.r1engine";
}
