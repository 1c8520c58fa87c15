// CUDA backend of the fused GRPO loss on materialized logits: TORCH_LIBRARY_IMPL(r1engine, CUDA) implementations of
// the contract schemas defined by csrc/torch/grpo_loss_ops.cpp (token_logprobs_fwd, grpo_fwd, logprobs_bwd,
// logprobs_bwd_), so that one torch.ops.r1engine.* operator dispatches by device.
//
// Layout of the work: one row of logits [V] per thread group. The group is a whole block of 256 threads for large
// vocabularies (V >= 4096, e.g. 151936) and a single warp for small ones (8 rows per block). Each thread walks its
// share of the row with 16-byte vector loads (float4, or 8 x bf16/fp16) when the row start is 16-byte aligned, and
// scalar loads otherwise and for the tail past the last full vector, so V need not be a multiple of the vector width.
// Every thread keeps an online (max, rescaled sum) pair in fp32, rescaling once per vector (about 1.1 exp per
// element); pairs are merged with warp shuffles and, for block groups, through shared memory. Lanes past V are never
// read (no padding, so nothing can add exp(0) to the sum). Rows whose weight is 0 are skipped before reading the
// row; in the backward, rows with dlogp == 0 are written as zeros without reading them. The backward may write the
// gradient over the logits (each element is read and then written by the same thread).
//
// Only ATen/c10/torch-library headers are included (never torch/extension.h, which pulls in Python).

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

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

struct MaxSum {
  float m;  // running max (-inf when empty)
  float s;  // sum of exp(x - m)
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};
  const float sa = a.m == -INFINITY ? 0.f : a.s * __expf(a.m - m);
  const float sb = b.m == -INFINITY ? 0.f : b.s * __expf(b.m - m);
  return {m, sa + sb};
}

// Adds n values (already scaled by 1/T) to a running pair, rescaling once.
template <int N>
__device__ __forceinline__ MaxSum absorb(MaxSum acc, const float (&x)[N]) {
  float mx = x[0];
#pragma unroll
  for (int k = 1; k < N; ++k) mx = fmaxf(mx, x[k]);
  const float m = fmaxf(acc.m, mx);
  if (m == -INFINITY) return acc;
  float s = acc.m == -INFINITY ? 0.f : acc.s * __expf(acc.m - m);
#pragma unroll
  for (int k = 0; k < N; ++k) s += __expf(x[k] - m);
  return {m, s};
}

__device__ __forceinline__ MaxSum warp_merge(MaxSum a) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    MaxSum b{__shfl_xor_sync(0xffffffffu, a.m, off), __shfl_xor_sync(0xffffffffu, a.s, off)};
    a = merge(a, b);
  }
  return a;
}

// Log-sum-exp of row[0..V) * inv_t by a group of GROUP threads (32 = one warp, kThreads = the whole block);
// `lane` is the thread's index in the group. Every thread of the group gets the result.
template <typename T, int GROUP, bool VEC>
__device__ float row_lse(const T* __restrict__ row, int64_t V, float inv_t, int lane, MaxSum* smem) {
  MaxSum acc{-INFINITY, 0.f};
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
      acc = absorb(acc, x);
    }
    done = nvec * kN;
  }
  for (int64_t i = done + lane; i < V; i += GROUP) {
    float x[1] = {to_f32(row[i]) * inv_t};
    acc = absorb(acc, x);
  }
  acc = warp_merge(acc);
  if constexpr (GROUP > 32) {
    const int warp = lane / 32;
    if ((lane & 31) == 0) smem[warp] = acc;
    __syncthreads();
    MaxSum all = smem[0];
#pragma unroll
    for (int w = 1; w < GROUP / 32; ++w) all = merge(all, smem[w]);
    __syncthreads();  // smem may be reused by the caller
    acc = all;
  }
  return acc.m + logf(acc.s);
}

// Group geometry: GROUP threads per row, kThreads / GROUP rows per block.
template <int GROUP>
__device__ __forceinline__ void group_coords(int64_t& row, int& lane) {
  row = static_cast<int64_t>(blockIdx.x) * (kThreads / GROUP) + threadIdx.x / GROUP;
  lane = threadIdx.x % GROUP;
}

template <typename T, int GROUP, bool VEC>
__global__ void __launch_bounds__(kThreads) token_logprobs_kernel(const T* __restrict__ logits, int64_t stride,
                                                                  const int64_t* __restrict__ targets, float* logp,
                                                                  float* lse_out, int64_t N, int64_t V, float inv_t) {
  __shared__ MaxSum smem[kWarps];
  int64_t row;
  int lane;
  group_coords<GROUP>(row, lane);
  if (row >= N) return;  // whole groups only: a block group never splits here
  const T* r = logits + row * stride;
  const float lse = row_lse<T, GROUP, VEC>(r, V, inv_t, lane, smem);
  if (lane == 0) {
    const int64_t t = targets[row];
    const float x_t = (t >= 0 && t < V) ? to_f32(r[t]) * inv_t : NAN;  // NaN flags an invalid target
    logp[row] = x_t - lse;
    lse_out[row] = lse;
  }
}

struct GrpoParams {
  float inv_t, eps_low, eps_high, dual_clip, beta;
  int kl_est;
  bool has_old, has_kl;
};

template <typename T, int GROUP, bool VEC>
__global__ void __launch_bounds__(kThreads)
    grpo_fwd_kernel(const T* __restrict__ logits, int64_t stride, const int64_t* __restrict__ targets,
                    const float* __restrict__ adv, const float* __restrict__ old, const float* __restrict__ ref,
                    const float* __restrict__ weights, float* loss, float* logp_out, float* lse_out, float* dlogp,
                    float* ratio_out, float* kl_out, float* clipped, int64_t N, int64_t V, GrpoParams p) {
  __shared__ MaxSum smem[kWarps];
  int64_t row;
  int lane;
  group_coords<GROUP>(row, lane);
  if (row >= N) return;
  const float w = weights[row];
  if (w == 0.f) return;  // outputs pre-filled (0, ratio 1): uniform over the group, so no barrier is skipped unevenly
  const T* r = logits + row * stride;
  const float lse = row_lse<T, GROUP, VEC>(r, V, p.inv_t, lane, smem);
  if (lane != 0) return;
  const int64_t t = targets[row];
  const float logp = ((t >= 0 && t < V) ? to_f32(r[t]) * p.inv_t : NAN) - lse;
  const float a = adv[row];
  const float ratio = p.has_old ? expf(logp - old[row]) : 1.f;
  const float lo = 1.f - p.eps_low, hi = 1.f + p.eps_high;
  const float unclipped = ratio * a;
  float surr = fminf(unclipped, fminf(fmaxf(ratio, lo), hi) * a);
  bool clip = (ratio < lo && a < 0.f) || (ratio > hi && a > 0.f);
  if (p.dual_clip > 1.f && a < 0.f && ratio > p.dual_clip) {  // then ratio * A < dual_clip * A: bound the loss
    surr = p.dual_clip * a;
    clip = true;
  }
  const float dsurr = clip ? 0.f : unclipped;
  float kl = 0.f, dkl = 0.f;
  if (p.has_kl) {
    const float d = ref[row] - logp;
    if (p.kl_est == 1) {
      kl = -d;
      dkl = 1.f;
    } else if (p.kl_est == 2) {
      kl = 0.5f * d * d;
      dkl = -d;
    } else {
      const float ed = expf(d);
      kl = ed - d - 1.f;
      dkl = 1.f - ed;
    }
  }
  loss[row] = w * (p.beta * kl - surr);
  logp_out[row] = logp;
  lse_out[row] = lse;
  dlogp[row] = w * (p.beta * dkl - dsurr);
  ratio_out[row] = ratio;
  kl_out[row] = kl;
  clipped[row] = clip ? 1.f : 0.f;
}

template <typename T, int GROUP, bool VEC>
__global__ void __launch_bounds__(kThreads)
    logprobs_bwd_kernel(const T* logits, int64_t stride, T* grad, int64_t gstride, const int64_t* __restrict__ targets,
                        const float* __restrict__ lse_in, const float* __restrict__ dlogp, int64_t N, int64_t V,
                        float inv_t) {
  int64_t row;
  int lane;
  group_coords<GROUP>(row, lane);
  if (row >= N) return;
  const float dl = dlogp[row];
  T* g = grad + row * gstride;
  constexpr int kN = Vec<T>::kN;
  const int64_t nvec = VEC ? V / kN : 0;
  if (dl == 0.f) {
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
        const float prob = __expf(to_f32(pack.v[k]) * inv_t - lse);
        out.v[k] = from_f32<T>(((col == t ? 1.f : 0.f) - prob) * scale);
      }
      gv[i] = out;
    }
  }
  for (int64_t i = nvec * kN + lane; i < V; i += GROUP) {
    const float prob = __expf(to_f32(r[i]) * inv_t - lse);
    g[i] = from_f32<T>(((i == t ? 1.f : 0.f) - prob) * scale);
  }
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

at::Tensor check_vec(const at::Tensor& t, const at::Tensor& logits, const char* name, const char* op) {
  TORCH_CHECK(t.device() == logits.device() && t.dim() == 1 && t.size(0) == logits.size(0), op, ": ", name,
              " must be a [", logits.size(0), "] tensor on ", logits.device(), "; got ", t.sizes(), " on ",
              t.device());
  return t.to(at::kFloat).contiguous();
}

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

std::tuple<at::Tensor, at::Tensor> token_logprobs_fwd_cuda(const at::Tensor& logits, const at::Tensor& targets_in,
                                                           double temperature) {
  check_logits(logits, targets_in, "token_logprobs_fwd");
  TORCH_CHECK(temperature > 0, "token_logprobs_fwd: temperature must be > 0; got ", temperature);
  c10::DeviceGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  const at::Tensor targets = targets_in.contiguous();
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, opts), lse = at::empty({N}, opts);
  if (N == 0) return {logp, lse};
  auto stream = R1_CURRENT_STREAM();
  const float inv_t = static_cast<float>(1.0 / temperature);
  launch(logits, nullptr, [&]<typename T, int GROUP, bool VEC>(int64_t blocks) {
    token_logprobs_kernel<T, GROUP, VEC><<<blocks, kThreads, 0, stream>>>(
        data_as<T>(logits), logits.stride(0), targets.data_ptr<int64_t>(), logp.data_ptr<float>(),
        lse.data_ptr<float>(), N, V, inv_t);
  });
  R1_LAUNCH_CHECK();
  return {logp, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grpo_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& targets_in, const at::Tensor& advantages,
    const std::optional<at::Tensor>& old_logp, const std::optional<at::Tensor>& ref_logp, const at::Tensor& weights,
    double temperature, double eps_low, double eps_high, double dual_clip, double beta, int64_t kl_estimator) {
  const char* op = "grpo_fwd";
  check_logits(logits, targets_in, op);
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0; got ", temperature);
  TORCH_CHECK(kl_estimator >= 1 && kl_estimator <= 3, op, ": kl_estimator must be 1, 2 or 3; got ", kl_estimator);
  c10::DeviceGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  const at::Tensor targets = targets_in.contiguous();
  const at::Tensor adv = check_vec(advantages, logits, "advantages", op);
  const at::Tensor w = check_vec(weights, logits, "weights", op);
  at::Tensor old, ref;
  if (old_logp.has_value()) old = check_vec(*old_logp, logits, "old_logp", op);
  const bool has_kl = ref_logp.has_value() && beta != 0.0;
  if (ref_logp.has_value()) ref = check_vec(*ref_logp, logits, "ref_logp", op);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::zeros({N}, opts), logp = at::zeros({N}, opts), lse = at::zeros({N}, opts),
             dlogp = at::zeros({N}, opts), ratio = at::ones({N}, opts), kl = at::zeros({N}, opts),
             clipped = at::zeros({N}, opts);
  if (N == 0) return {loss, logp, lse, dlogp, ratio, kl, clipped};
  GrpoParams p{static_cast<float>(1.0 / temperature),
               static_cast<float>(eps_low),
               static_cast<float>(eps_high),
               static_cast<float>(dual_clip),
               static_cast<float>(beta),
               static_cast<int>(kl_estimator),
               old.defined(),
               has_kl};
  auto stream = R1_CURRENT_STREAM();
  const float* old_ptr = old.defined() ? old.data_ptr<float>() : nullptr;
  const float* ref_ptr = has_kl ? ref.data_ptr<float>() : nullptr;
  launch(logits, nullptr, [&]<typename T, int GROUP, bool VEC>(int64_t blocks) {
    grpo_fwd_kernel<T, GROUP, VEC><<<blocks, kThreads, 0, stream>>>(
        data_as<T>(logits), logits.stride(0), targets.data_ptr<int64_t>(), adv.data_ptr<float>(), old_ptr, ref_ptr,
        w.data_ptr<float>(), loss.data_ptr<float>(), logp.data_ptr<float>(), lse.data_ptr<float>(),
        dlogp.data_ptr<float>(), ratio.data_ptr<float>(), kl.data_ptr<float>(), clipped.data_ptr<float>(), N, V, p);
  });
  R1_LAUNCH_CHECK();
  return {loss, logp, lse, dlogp, ratio, kl, clipped};
}

void logprobs_bwd_into(const at::Tensor& logits, const at::Tensor& grad, const at::Tensor& targets_in,
                       const at::Tensor& lse_in, const at::Tensor& dlogp_in, double temperature, const char* op) {
  check_logits(logits, targets_in, op);
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0; got ", temperature);
  c10::DeviceGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  if (N == 0) return;
  const at::Tensor targets = targets_in.contiguous();
  const at::Tensor lse = check_vec(lse_in, logits, "lse", op);
  const at::Tensor dlogp = check_vec(dlogp_in, logits, "dlogp", op);
  auto stream = R1_CURRENT_STREAM();
  const float inv_t = static_cast<float>(1.0 / temperature);
  launch(logits, &grad, [&]<typename T, int GROUP, bool VEC>(int64_t blocks) {
    logprobs_bwd_kernel<T, GROUP, VEC><<<blocks, kThreads, 0, stream>>>(
        data_as<T>(logits), logits.stride(0), reinterpret_cast<T*>(grad.data_ptr()), grad.stride(0),
        targets.data_ptr<int64_t>(), lse.data_ptr<float>(), dlogp.data_ptr<float>(), N, V, inv_t);
  });
  R1_LAUNCH_CHECK();
}

at::Tensor logprobs_bwd_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                             const at::Tensor& dlogp, double temperature) {
  at::Tensor grad = at::empty(logits.sizes(), logits.options());  // contiguous
  logprobs_bwd_into(logits, grad, targets, lse, dlogp, temperature, "logprobs_bwd");
  return grad;
}

void logprobs_bwd_inplace_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                               const at::Tensor& dlogp, double temperature) {
  logprobs_bwd_into(logits, logits, targets, lse, dlogp, temperature, "logprobs_bwd_");
}

}  // namespace
}  // namespace r1engine

TORCH_LIBRARY_IMPL(r1engine, CUDA, m) {
  m.impl("token_logprobs_fwd", &r1engine::token_logprobs_fwd_cuda);
  m.impl("grpo_fwd", &r1engine::grpo_fwd_cuda);
  m.impl("logprobs_bwd", &r1engine::logprobs_bwd_cuda);
  m.impl("logprobs_bwd_", &r1engine::logprobs_bwd_inplace_cuda);
}
