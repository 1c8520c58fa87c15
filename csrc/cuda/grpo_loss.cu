// CUDA backend of the vocabulary passes of the GRPO-family losses on materialized logits: the
// TORCH_LIBRARY_IMPL(r1engine, CUDA) implementations of the contract schemas defined by csrc/torch/grpo_loss_ops.cpp
// (logprobs_fwd, logprobs_bwd, logprobs_bwd_), so that one torch.ops.r1engine.* operator dispatches by device. The
// O(N) loss math on the per-token results lives in PyTorch (r1engine/algo/policy_loss.py); the semantics are those
// of r1engine/ops/backends/torch_ref.py.
//
// Layout of the work: one row of logits [V] per thread group. The group is a whole block of 256 threads for large
// vocabularies (V >= 4096, e.g. 151936) and a single warp for small ones (8 rows per block). Each thread walks its
// share of the row with 16-byte vector loads (float4, or 8 x bf16/fp16) when the row start is 16-byte aligned, and
// scalar loads otherwise and for the tail past the last full vector, so V need not be a multiple of the vector width.
// Every thread keeps an online (max, rescaled sum) pair in fp32, rescaling once per vector (about 1.1 exp per
// element); pairs are merged with warp shuffles and, for block groups, through shared memory. Lanes past V are never
// read (no padding, so nothing can add exp(0) to the sum).
//
// Entropy (optional, same pass): beside the sum s = sum exp(z - m) each thread keeps u = sum exp(z - m) * (z - m),
// shifted by the running max like s, so that both are rescaled together when the max grows
// (u' = (u + (m - m') * s) * exp(m - m')); then H = lse - E_p[z] = log(s) - u / s. Keeping z - m instead of z avoids
// the cancellation of lse - E_p[z] for large logits. A -inf logit has p = 0 and contributes 0 (not 0 * -inf = NaN).
//
// Rows whose `live` is 0 are skipped before reading the row (all outputs 0); in the backward, rows whose dlogp and
// dentropy are both 0 are written as zeros without reading them. The backward may write the gradient over the
// logits (each element is read and then written by the same thread).
//
// Only ATen/c10/torch-library headers are included (never torch/extension.h, which pulls in Python).

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

// The CPU torch wheel used for the CI compile check ships c10/cuda headers without their generated
// cuda_cmake_macros.h; there the kernels still compile, launched on the legacy default stream. A CUDA torch build
// (the only one that runs this file) takes the first branch and uses torch's current stream.
#if __has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#include <c10/cuda/CUDAStream.h>
#define R1_CURRENT_STREAM() (c10::cuda::getCurrentCUDAStream().stream())
#else
#define R1_CURRENT_STREAM() (cudaStream_t{nullptr})
#endif
#define R1_LAUNCH_CHECK()                                                                   \
  do {                                                                                      \
    const cudaError_t r1_err = cudaGetLastError();                                          \
    TORCH_CHECK(r1_err == cudaSuccess, "CUDA kernel launch failed: ", cudaGetErrorString(r1_err)); \
  } while (0)

namespace r1engine {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kBlockRowMinV = 4096;  // at and above this V a whole block handles one row

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }

// 16 bytes of T.
template <typename T>
struct alignas(16) Vec {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

// Online softmax statistics of a set of values z (already scaled by 1/T).
struct Acc {
  float m;  // running max (-inf when empty)
  float s;  // sum of exp(z - m)
  float u;  // sum of exp(z - m) * (z - m): only maintained when the entropy is asked for (ENT)
};

// The contribution of `a` rescaled to a max m >= a.m (m finite): adds it to r.
template <bool ENT>
__device__ __forceinline__ void add_rescaled(Acc& r, const Acc& a, float m) {
  if (a.m == -INFINITY) return;  // empty: adds 0 (and (a.m - m) * a.s would be -inf * 0)
  const float d = a.m - m;
  const float f = __expf(d);
  r.s = fmaf(a.s, f, r.s);
  if constexpr (ENT) r.u = fmaf(fmaf(d, a.s, a.u), f, r.u);
}

template <bool ENT>
__device__ __forceinline__ Acc merge(const Acc& a, const Acc& b) {
  Acc r{fmaxf(a.m, b.m), 0.f, 0.f};
  if (r.m == -INFINITY) return r;
  add_rescaled<ENT>(r, a, r.m);
  add_rescaled<ENT>(r, b, r.m);
  return r;
}

// Adds n values (already scaled by 1/T) to a running accumulator, rescaling once.
template <bool ENT, int N>
__device__ __forceinline__ Acc absorb(const Acc& acc, const float (&x)[N]) {
  float mx = x[0];
#pragma unroll
  for (int k = 1; k < N; ++k) mx = fmaxf(mx, x[k]);
  Acc r{fmaxf(acc.m, mx), 0.f, 0.f};
  if (r.m == -INFINITY) return acc;
  add_rescaled<ENT>(r, acc, r.m);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float d = x[k] - r.m;
    const float e = __expf(d);
    r.s += e;
    // -inf logit: e = 0, and the clamp keeps 0 * d finite (0, not NaN).
    if constexpr (ENT) r.u = fmaf(e, fmaxf(d, -FLT_MAX), r.u);
  }
  return r;
}

template <bool ENT>
__device__ __forceinline__ Acc warp_merge(Acc a) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Acc b{__shfl_xor_sync(0xffffffffu, a.m, off), __shfl_xor_sync(0xffffffffu, a.s, off), 0.f};
    if constexpr (ENT) b.u = __shfl_xor_sync(0xffffffffu, a.u, off);
    a = merge<ENT>(a, b);
  }
  return a;
}

// Online softmax statistics of row[0..V) * inv_t by a group of GROUP threads (32 = one warp, kThreads = the whole
// block); `lane` is the thread's index in the group. Every thread of the group gets the result.
template <typename T, int GROUP, bool VEC, bool ENT>
__device__ Acc row_stats(const T* __restrict__ row, int64_t V, float inv_t, int lane, Acc* smem) {
  Acc acc{-INFINITY, 0.f, 0.f};
  int64_t done = 0;
  if constexpr (VEC) {
    constexpr int kN = Vec<T>::kN;
    const int64_t nvec = V / kN;
    const Vec<T>* rv = reinterpret_cast<const Vec<T>*>(row);
#pragma unroll 4
    for (int64_t i = lane; i < nvec; i += GROUP) {
      const Vec<T> pack = rv[i];
      float x[kN];
#pragma unroll
      for (int k = 0; k < kN; ++k) x[k] = to_f32(pack.v[k]) * inv_t;
      acc = absorb<ENT>(acc, x);
    }
    done = nvec * kN;
  }
  for (int64_t i = done + lane; i < V; i += GROUP) {
    float x[1] = {to_f32(row[i]) * inv_t};
    acc = absorb<ENT>(acc, x);
  }
  acc = warp_merge<ENT>(acc);
  if constexpr (GROUP > 32) {
    const int warp = lane / 32;
    if ((lane & 31) == 0) smem[warp] = acc;
    __syncthreads();
    Acc all = smem[0];
#pragma unroll
    for (int w = 1; w < GROUP / 32; ++w) all = merge<ENT>(all, smem[w]);
    __syncthreads();  // smem may be reused by the caller
    acc = all;
  }
  return acc;
}

// Group geometry: GROUP threads per row, kThreads / GROUP rows per block.
template <int GROUP>
__device__ __forceinline__ void group_coords(int64_t& row, int& lane) {
  row = static_cast<int64_t>(blockIdx.x) * (kThreads / GROUP) + threadIdx.x / GROUP;
  lane = threadIdx.x % GROUP;
}

template <typename T, int GROUP, bool VEC, bool ENT>
__global__ void __launch_bounds__(kThreads)
    logprobs_fwd_kernel(const T* __restrict__ logits, int64_t stride, const int64_t* __restrict__ targets,
                        const float* __restrict__ live, float* logp, float* lse_out, float* ent_out, int64_t N,
                        int64_t V, float inv_t) {
  __shared__ Acc smem[kWarps];
  int64_t row;
  int lane;
  group_coords<GROUP>(row, lane);
  if (row >= N) return;  // whole groups only: a block group never splits here
  // Not live: uniform over the group, so no barrier of row_stats is skipped unevenly.
  if (live != nullptr && live[row] == 0.f) {
    if (lane == 0) {
      logp[row] = 0.f;
      lse_out[row] = 0.f;
      if constexpr (ENT) ent_out[row] = 0.f;
    }
    return;
  }
  const T* r = logits + row * stride;
  const Acc acc = row_stats<T, GROUP, VEC, ENT>(r, V, inv_t, lane, smem);
  if (lane == 0) {
    const float log_s = logf(acc.s);
    const float lse = acc.m + log_s;
    const int64_t t = targets[row];
    const float x_t = (t >= 0 && t < V) ? to_f32(r[t]) * inv_t : NAN;  // NaN flags an invalid target
    logp[row] = x_t - lse;
    lse_out[row] = lse;
    if constexpr (ENT) ent_out[row] = log_s - acc.u / acc.s;
  }
}

// One gradient element: ENT: onehot * g - p * (g + e * (z - c)) with c = lse - H; else (onehot - p) * g; g and e
// include 1/T. With the entropy term a -inf logit (p = 0) gives 0, not 0 * inf = NaN.
template <bool ENT>
__device__ __forceinline__ float grad_elem(float z, bool is_t, float lse, float g, float e, float c) {
  const float p = __expf(z - lse);
  if constexpr (ENT) {
    const float q = p == 0.f ? 0.f : p * fmaf(e, z - c, g);
    return (is_t ? g : 0.f) - q;
  } else {
    return ((is_t ? 1.f : 0.f) - p) * g;
  }
}

template <typename T, int GROUP, bool VEC, bool ENT>
__device__ __forceinline__ void bwd_row(const T* r, T* g, int64_t V, int64_t t, float lse, float scale, float e,
                                        float c, float inv_t, int lane) {
  constexpr int kN = Vec<T>::kN;
  const int64_t nvec = VEC ? V / kN : 0;
  if constexpr (VEC) {
    const Vec<T>* rv = reinterpret_cast<const Vec<T>*>(r);
    Vec<T>* gv = reinterpret_cast<Vec<T>*>(g);
#pragma unroll 4
    for (int64_t i = lane; i < nvec; i += GROUP) {
      const Vec<T> pack = rv[i];
      Vec<T> out;
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        const int64_t col = i * kN + k;
        out.v[k] = from_f32<T>(grad_elem<ENT>(to_f32(pack.v[k]) * inv_t, col == t, lse, scale, e, c));
      }
      gv[i] = out;
    }
  }
  for (int64_t i = nvec * kN + lane; i < V; i += GROUP)
    g[i] = from_f32<T>(grad_elem<ENT>(to_f32(r[i]) * inv_t, i == t, lse, scale, e, c));
}

// HAS_ENT: dentropy and entropy are given; rows whose dentropy is 0 still take the plain (cheaper) path.
template <typename T, int GROUP, bool VEC, bool HAS_ENT>
__global__ void __launch_bounds__(kThreads)
    logprobs_bwd_kernel(const T* logits, int64_t stride, T* grad, int64_t gstride, const int64_t* __restrict__ targets,
                        const float* __restrict__ lse_in, const float* __restrict__ dlogp,
                        const float* __restrict__ dent, const float* __restrict__ ent, int64_t N, int64_t V,
                        float inv_t) {
  int64_t row;
  int lane;
  group_coords<GROUP>(row, lane);
  if (row >= N) return;
  const float dl = dlogp[row];
  const float de = HAS_ENT ? dent[row] : 0.f;
  T* g = grad + row * gstride;
  if (dl == 0.f && de == 0.f) {
    constexpr int kN = Vec<T>::kN;
    const int64_t nvec = VEC ? V / kN : 0;
    if constexpr (VEC) {
      Vec<T> z;
#pragma unroll
      for (int k = 0; k < kN; ++k) z.v[k] = from_f32<T>(0.f);
      Vec<T>* gv = reinterpret_cast<Vec<T>*>(g);
      for (int64_t i = lane; i < nvec; i += GROUP) gv[i] = z;
    }
    for (int64_t i = nvec * kN + lane; i < V; i += GROUP) g[i] = from_f32<T>(0.f);
    return;
  }
  const T* r = logits + row * stride;
  const float lse = lse_in[row];
  const float scale = dl * inv_t;
  const int64_t t = targets[row];
  if constexpr (HAS_ENT) {
    if (de != 0.f) {  // uniform over the group
      bwd_row<T, GROUP, VEC, true>(r, g, V, t, lse, scale, de * inv_t, lse - ent[row], inv_t, lane);
      return;
    }
  }
  bwd_row<T, GROUP, VEC, false>(r, g, V, t, lse, scale, 0.f, 0.f, inv_t, lane);
}

// ---------------------------------------------------------------------------------------------------------------
// Host side

void check_logits(const at::Tensor& logits, const at::Tensor& targets, const char* op) {
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor; got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [N, V]; got shape ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                  logits.scalar_type() == at::kHalf,
              op, ": logits must be float32, bfloat16 or float16; got ", logits.scalar_type());
  TORCH_CHECK(logits.size(1) > 0, op, ": logits must have V > 0");
  TORCH_CHECK(logits.stride(1) == 1, op, ": logits rows must be contiguous (stride(1) == 1); got strides ",
              logits.strides());
  TORCH_CHECK(targets.device() == logits.device() && targets.scalar_type() == at::kLong && targets.dim() == 1 &&
                  targets.size(0) == logits.size(0),
              op, ": targets must be int64 [", logits.size(0), "] on ", logits.device(), "; got ",
              targets.scalar_type(), " ", targets.sizes(), " on ", targets.device());
}

void check_temperature(double temperature, const char* op) {
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0; got ", temperature);
}

at::Tensor check_vec(const at::Tensor& t, const at::Tensor& logits, const char* name, const char* op) {
  TORCH_CHECK(t.device() == logits.device() && t.dim() == 1 && t.size(0) == logits.size(0), op, ": ", name,
              " must be a [", logits.size(0), "] tensor on ", logits.device(), "; got ", t.sizes(), " on ",
              t.device());
  return t.to(at::kFloat).contiguous();
}

at::Tensor check_opt_vec(const std::optional<at::Tensor>& t, const at::Tensor& logits, const char* name,
                         const char* op) {
  return t.has_value() ? check_vec(*t, logits, name, op) : at::Tensor();
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

template <typename T>
bool vec_ok(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.stride(0) * sizeof(T)) % 16 == 0;
}

// Calls f.template operator()<T, GROUP, VEC>(blocks) for the logits dtype, the group size picked from V and the
// alignment of both tensors.
template <typename F>
void launch(const at::Tensor& logits, const at::Tensor* other, F&& f) {
  const int64_t N = logits.size(0), V = logits.size(1);
  auto go = [&](auto tag) {
    using T = decltype(tag);
    const bool vec = vec_ok<T>(logits) && (other == nullptr || vec_ok<T>(*other));
    if (V >= kBlockRowMinV) {
      const int64_t blocks = N;
      vec ? f.template operator()<T, kThreads, true>(blocks) : f.template operator()<T, kThreads, false>(blocks);
    } else {
      const int64_t blocks = (N + kWarps - 1) / kWarps;
      vec ? f.template operator()<T, 32, true>(blocks) : f.template operator()<T, 32, false>(blocks);
    }
  };
  switch (logits.scalar_type()) {
    case at::kFloat:
      go(float{});
      break;
    case at::kBFloat16:
      go(__nv_bfloat16{});
      break;
    default:
      go(__half{});
      break;
  }
}

template <typename T>
const T* data_as(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cuda(const at::Tensor& logits,
                                                                 const at::Tensor& targets_in,
                                                                 const std::optional<at::Tensor>& live_in,
                                                                 double temperature, bool entropy) {
  const char* op = "logprobs_fwd";
  check_logits(logits, targets_in, op);
  check_temperature(temperature, op);
  c10::DeviceGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  const at::Tensor targets = targets_in.contiguous();
  const at::Tensor live = check_opt_vec(live_in, logits, "live", op);
  auto opts = logits.options().dtype(at::kFloat);
  // Every row of logp and lse is written by the kernel (0 for rows that are not live); the entropy only when asked.
  at::Tensor logp = at::empty({N}, opts), lse = at::empty({N}, opts);
  at::Tensor ent = entropy ? at::empty({N}, opts) : at::zeros({N}, opts);
  if (N == 0) return {logp, lse, ent};
  auto stream = R1_CURRENT_STREAM();
  const float inv_t = static_cast<float>(1.0 / temperature);
  const float* live_ptr = ptr_or_null(live);
  launch(logits, nullptr, [&]<typename T, int GROUP, bool VEC>(int64_t blocks) {
    auto k = entropy ? logprobs_fwd_kernel<T, GROUP, VEC, true> : logprobs_fwd_kernel<T, GROUP, VEC, false>;
    k<<<blocks, kThreads, 0, stream>>>(data_as<T>(logits), logits.stride(0), targets.data_ptr<int64_t>(), live_ptr,
                                       logp.data_ptr<float>(), lse.data_ptr<float>(), ent.data_ptr<float>(), N, V,
                                       inv_t);
  });
  R1_LAUNCH_CHECK();
  return {logp, lse, ent};
}

void logprobs_bwd_into(const at::Tensor& logits, const at::Tensor& grad, const at::Tensor& targets_in,
                       const at::Tensor& lse_in, const at::Tensor& dlogp_in,
                       const std::optional<at::Tensor>& dentropy_in, const std::optional<at::Tensor>& entropy_in,
                       double temperature, const char* op) {
  check_logits(logits, targets_in, op);
  check_temperature(temperature, op);
  TORCH_CHECK(dentropy_in.has_value() == entropy_in.has_value(), op,
              ": dentropy and entropy: expected both or neither");
  c10::DeviceGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  const at::Tensor lse = check_vec(lse_in, logits, "lse", op);
  const at::Tensor dlogp = check_vec(dlogp_in, logits, "dlogp", op);
  const at::Tensor dent = check_opt_vec(dentropy_in, logits, "dentropy", op);
  const at::Tensor ent = check_opt_vec(entropy_in, logits, "entropy", op);
  if (N == 0) return;
  const at::Tensor targets = targets_in.contiguous();
  const bool has_ent = dent.defined();
  auto stream = R1_CURRENT_STREAM();
  const float inv_t = static_cast<float>(1.0 / temperature);
  launch(logits, &grad, [&]<typename T, int GROUP, bool VEC>(int64_t blocks) {
    auto k = has_ent ? logprobs_bwd_kernel<T, GROUP, VEC, true> : logprobs_bwd_kernel<T, GROUP, VEC, false>;
    k<<<blocks, kThreads, 0, stream>>>(data_as<T>(logits), logits.stride(0), reinterpret_cast<T*>(grad.data_ptr()),
                                       grad.stride(0), targets.data_ptr<int64_t>(), lse.data_ptr<float>(),
                                       dlogp.data_ptr<float>(), ptr_or_null(dent), ptr_or_null(ent), N, V, inv_t);
  });
  R1_LAUNCH_CHECK();
}

at::Tensor logprobs_bwd_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                             const at::Tensor& dlogp, const std::optional<at::Tensor>& dentropy,
                             const std::optional<at::Tensor>& entropy, double temperature) {
  at::Tensor grad = at::empty(logits.sizes(), logits.options());  // contiguous
  logprobs_bwd_into(logits, grad, targets, lse, dlogp, dentropy, entropy, temperature, "logprobs_bwd");
  return grad;
}

void logprobs_bwd_inplace_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                               const at::Tensor& dlogp, const std::optional<at::Tensor>& dentropy,
                               const std::optional<at::Tensor>& entropy, double temperature) {
  logprobs_bwd_into(logits, logits, targets, lse, dlogp, dentropy, entropy, temperature, "logprobs_bwd_");
}

}  // namespace
}  // namespace r1engine

TORCH_LIBRARY_IMPL(r1engine, CUDA, m) {
  m.impl("logprobs_fwd", &r1engine::logprobs_fwd_cuda);
  m.impl("logprobs_bwd", &r1engine::logprobs_bwd_cuda);
  m.impl("logprobs_bwd_", &r1engine::logprobs_bwd_inplace_cuda);
}
