// Multi-tensor AdamW for CUDA: plain CUDA kernels and a C-style launcher.
//
// No torch headers here (the torch-facing glue is adamw_cuda.cpp), so this file compiles with
// nothing but the CUDA toolkit: `nvcc -arch=sm_90 -c adamw_cuda_kernel.cu`.
//
// The work is described by one int64 table on the device, the same one the Triton kernel in
// kernels/adamw.py reads:
//
//   rows 0..7, one column per tensor (row r of tensor t at table[r * n_tensors + t]):
//     param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (0 if unused), master (0 if unused),
//     step (pointer to an fp32 scalar), numel
//   then n_chunks entries: (tensor index << 32) | chunk index within the tensor
//
// Launch 1 increments every step (skipped when *found_inf != 0). Launch 2 runs one block per
// chunk of `chunk` elements; it returns at once when *found_inf != 0.
//
// Numerics as the CPU kernel and torch.optim.AdamW: fp32 math, bias corrections in double,
// explicit fmaf where torch's kernels fuse (lerp, addcmul, add with alpha), IEEE division and
// sqrt (no fast math), round to nearest even when storing bf16/fp16.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

// dtype codes of the launcher (adamw_cuda.cpp declares the same).
#define FASTTRAIN_DTYPE_FLOAT32 0
#define FASTTRAIN_DTYPE_BFLOAT16 1
#define FASTTRAIN_DTYPE_FLOAT16 2

namespace {

constexpr int kRowParam = 0;
constexpr int kRowGrad = 1;
constexpr int kRowExpAvg = 2;
constexpr int kRowExpAvgSq = 3;
constexpr int kRowMaxExpAvgSq = 4;
constexpr int kRowMaster = 5;
constexpr int kRowStep = 6;
constexpr int kRowNumel = 7;
constexpr int kTableRows = 8;

constexpr int kThreads = 256;
constexpr int kStepThreads = 256;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// N consecutive elements of T starting at an index that is a multiple of N, from a 16-byte
// aligned tensor: moved as 16-byte words (or one smaller word when N * sizeof(T) < 16).
template <typename T, int N>
struct Pack {
  static constexpr int kBytes = N * static_cast<int>(sizeof(T));
  static constexpr int kWords = kBytes >= 16 ? kBytes / 16 : 1;
  static_assert(kBytes % 16 == 0 || kBytes < 16, "pack size");
  using Word = typename std::conditional<
      kBytes >= 16, uint4,
      typename std::conditional<kBytes == 8, uint2,
                                typename std::conditional<kBytes == 4, uint32_t,
                                                          uint16_t>::type>::type>::type;
  union {
    Word words[kWords];
    T elems[N];
  };

  __device__ __forceinline__ void load(const T* base, int64_t index) {
    const Word* src = reinterpret_cast<const Word*>(base + index);
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      words[w] = src[w];
    }
  }
  __device__ __forceinline__ void store(T* base, int64_t index) const {
    Word* dst = reinterpret_cast<Word*>(base + index);
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      dst[w] = words[w];
    }
  }
};

// Scalars of one tensor's update.
struct Scalars {
  float grad_mul_scale;
  float grad_mul_clip;
  float grad_sign;
  float weight_decay;
  float decay;
  float lerp_coef;
  bool lerp_small;
  float beta2;
  float one_minus_beta2;
  float eps;
  float step_size;
  float bc2_sqrt;
  bool decoupled;
  bool amsgrad;
};

// One element of AdamW; p, g (already unscaled), m, v (and v_max) in fp32, updated in place.
__device__ __forceinline__ void adamw_element(const Scalars& s, float& p, float g, float& m,
                                              float& v, float& v_max) {
  g = g * s.grad_mul_clip;
  g = g * s.grad_sign;
  if (s.decoupled) {
    p = p * s.decay;
  } else {
    g = fmaf(s.weight_decay, p, g);
  }
  // torch's lerp: m + w * (g - m) if w < 0.5, else g - (g - m) * (1 - w).
  m = fmaf(s.lerp_coef, g - m, s.lerp_small ? m : g);
  v = fmaf(s.one_minus_beta2 * g, g, __fmul_rn(v, s.beta2));
  float v_hat = v;
  if (s.amsgrad) {
    v_max = (v_max > v || v_max != v_max) ? v_max : v;  // torch.maximum: NaN propagates
    v_hat = v_max;
  }
  const float denom = __fdiv_rn(sqrtf(v_hat), s.bc2_sqrt) + s.eps;
  // torch's addcdiv (and its fused CUDA step): p + (-step_size * m) / denom, not an fma
  p = __fadd_rn(p, __fdiv_rn(__fmul_rn(-s.step_size, m), denom));
}

struct Options {
  double lr;
  const float* lr_ptr;  // device fp32 scalar; overrides lr when not null
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool decoupled;
  bool amsgrad;
  bool maximize;
  const float* inv_scale;  // device fp32 scalars, null when absent
  const float* found_inf;
  const float* clip_coef;
};

__global__ void step_increment_kernel(const int64_t* __restrict__ table, int64_t n_tensors,
                                      const float* __restrict__ found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) {
    return;
  }
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < n_tensors) {
    float* step = reinterpret_cast<float*>(table[kRowStep * n_tensors + t]);
    *step += 1.0f;
  }
}

// amsgrad is a uniform runtime branch (it halves the number of instantiations, and so the
// compile time); master weights change what is loaded, so they are a template parameter.
template <typename P, typename G, typename S, bool kMaster>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const int64_t* __restrict__ table, int64_t n_tensors, int64_t chunk,
                 Options o) {
  if (o.found_inf != nullptr && *o.found_inf != 0.0f) {
    return;
  }
  const int64_t entry = table[kTableRows * n_tensors + blockIdx.x];
  const int64_t t = entry >> 32;
  const int64_t start = (entry & 0xFFFFFFFFll) * chunk;
  const int64_t numel = table[kRowNumel * n_tensors + t];
  const int64_t end = min(start + chunk, numel);
  if (start >= end) {
    return;
  }

  P* param = reinterpret_cast<P*>(table[kRowParam * n_tensors + t]);
  G* grad = reinterpret_cast<G*>(table[kRowGrad * n_tensors + t]);
  S* exp_avg = reinterpret_cast<S*>(table[kRowExpAvg * n_tensors + t]);
  S* exp_avg_sq = reinterpret_cast<S*>(table[kRowExpAvgSq * n_tensors + t]);
  const bool amsgrad = o.amsgrad;
  S* max_exp_avg_sq =
      amsgrad ? reinterpret_cast<S*>(table[kRowMaxExpAvgSq * n_tensors + t]) : nullptr;
  float* master = kMaster ? reinterpret_cast<float*>(table[kRowMaster * n_tensors + t]) : nullptr;
  const float* step_ptr = reinterpret_cast<const float*>(table[kRowStep * n_tensors + t]);

  // Scalars, as torch computes them from Python floats: fp32 casts of double expressions;
  // bias corrections in double.
  const double step = static_cast<double>(*step_ptr);
  const double lr = o.lr_ptr != nullptr ? static_cast<double>(*o.lr_ptr) : o.lr;
  Scalars s;
  s.grad_mul_scale = o.inv_scale != nullptr ? *o.inv_scale : 1.0f;
  // With a grad scaler the unscaled grads are written back, as torch's fused optimizers do.
  const bool store_grad = o.inv_scale != nullptr;
  s.grad_mul_clip = o.clip_coef != nullptr ? *o.clip_coef : 1.0f;
  s.grad_sign = o.maximize ? -1.0f : 1.0f;
  s.weight_decay = static_cast<float>(o.weight_decay);
  s.decay = static_cast<float>(1.0 - lr * o.weight_decay);
  // With weight_decay == 0 torch skips the decay; the L2 form would turn an inf param to NaN.
  s.decoupled = o.decoupled || o.weight_decay == 0.0;
  s.amsgrad = amsgrad;
  const float w = static_cast<float>(1.0 - o.beta1);
  s.lerp_small = fabsf(w) < 0.5f;
  s.lerp_coef = s.lerp_small ? w : w - 1.0f;
  s.beta2 = static_cast<float>(o.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - o.beta2);
  s.eps = static_cast<float>(o.eps);
  const double bc1 = 1.0 - pow(o.beta1, step);
  const double bc2 = 1.0 - pow(o.beta2, step);
  s.step_size = static_cast<float>(lr / bc1);
  s.bc2_sqrt = static_cast<float>(sqrt(bc2));

  // Vector path: VEC elements per thread and iteration, 16-byte words for the widest arrays.
  constexpr int kMinSize = sizeof(P) < sizeof(S) ? (sizeof(P) < sizeof(G) ? sizeof(P)
                                                                            : sizeof(G))
                                                 : (sizeof(S) < sizeof(G) ? sizeof(S)
                                                                          : sizeof(G));
  constexpr int VEC = 16 / kMinSize;
  uintptr_t any_bits = reinterpret_cast<uintptr_t>(param) | reinterpret_cast<uintptr_t>(grad) |
                       reinterpret_cast<uintptr_t>(exp_avg) |
                       reinterpret_cast<uintptr_t>(exp_avg_sq);
  if (amsgrad) any_bits |= reinterpret_cast<uintptr_t>(max_exp_avg_sq);
  if (kMaster) any_bits |= reinterpret_cast<uintptr_t>(master);
  const bool aligned = (any_bits & 15) == 0 && start % VEC == 0;

  int64_t tail_start = start;
  if (aligned) {
    const int64_t n_vec = (end - start) / VEC;
    for (int64_t k = threadIdx.x; k < n_vec; k += blockDim.x) {
      const int64_t i = start + k * VEC;
      Pack<G, VEC> g_in;
      Pack<S, VEC> m_in, v_in, vmax_in;
      Pack<P, VEC> p_in;
      Pack<float, VEC> master_in;
      g_in.load(grad, i);
      if (store_grad) {  // stored first: the pack is not kept alive through the update
        Pack<G, VEC> unscaled;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          unscaled.elems[j] = from_float<G>(to_float(g_in.elems[j]) * s.grad_mul_scale);
        }
        unscaled.store(grad, i);
      }
      m_in.load(exp_avg, i);
      v_in.load(exp_avg_sq, i);
      if (amsgrad) vmax_in.load(max_exp_avg_sq, i);
      if (kMaster) {
        master_in.load(master, i);
      } else {
        p_in.load(param, i);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float p = kMaster ? master_in.elems[j] : to_float(p_in.elems[j]);
        float m = to_float(m_in.elems[j]);
        float v = to_float(v_in.elems[j]);
        float v_max = amsgrad ? to_float(vmax_in.elems[j]) : 0.0f;
        adamw_element(s, p, to_float(g_in.elems[j]) * s.grad_mul_scale, m, v, v_max);
        m_in.elems[j] = from_float<S>(m);
        v_in.elems[j] = from_float<S>(v);
        if (amsgrad) vmax_in.elems[j] = from_float<S>(v_max);
        if (kMaster) master_in.elems[j] = p;
        p_in.elems[j] = from_float<P>(p);
      }
      m_in.store(exp_avg, i);
      v_in.store(exp_avg_sq, i);
      if (amsgrad) vmax_in.store(max_exp_avg_sq, i);
      if (kMaster) master_in.store(master, i);
      p_in.store(param, i);
    }
    tail_start = start + n_vec * VEC;
  }
  // Scalar path: unaligned tensors, and the last (end - start) % VEC elements.
  for (int64_t i = tail_start + threadIdx.x; i < end; i += blockDim.x) {
    float p = kMaster ? master[i] : to_float(param[i]);
    float m = to_float(exp_avg[i]);
    float v = to_float(exp_avg_sq[i]);
    float v_max = amsgrad ? to_float(max_exp_avg_sq[i]) : 0.0f;
    const float g = to_float(grad[i]) * s.grad_mul_scale;
    if (store_grad) grad[i] = from_float<G>(g);
    adamw_element(s, p, g, m, v, v_max);
    exp_avg[i] = from_float<S>(m);
    exp_avg_sq[i] = from_float<S>(v);
    if (amsgrad) max_exp_avg_sq[i] = from_float<S>(v_max);
    if (kMaster) master[i] = p;
    param[i] = from_float<P>(p);
  }
}

template <typename P, typename G, typename S>
cudaError_t launch_update(bool has_master, const int64_t* table, int64_t n_tensors,
                          int64_t n_chunks, int64_t chunk, const Options& o,
                          cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(n_chunks));
  if (has_master) {
    adamw_kernel<P, G, S, true><<<grid, kThreads, 0, stream>>>(table, n_tensors, chunk, o);
  } else {
    adamw_kernel<P, G, S, false><<<grid, kThreads, 0, stream>>>(table, n_tensors, chunk, o);
  }
  return cudaGetLastError();
}

template <typename P, typename G>
cudaError_t launch_state(int state_dtype, bool has_master, const int64_t* table,
                         int64_t n_tensors, int64_t n_chunks, int64_t chunk, const Options& o,
                         cudaStream_t stream) {
  switch (state_dtype) {
    case FASTTRAIN_DTYPE_FLOAT32:
      return launch_update<P, G, float>(has_master, table, n_tensors, n_chunks, chunk, o,
                                        stream);
    case FASTTRAIN_DTYPE_BFLOAT16:
      return launch_update<P, G, __nv_bfloat16>(has_master, table, n_tensors, n_chunks, chunk,
                                                o, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" cudaError_t fasttrain_adamw_cuda_launch(
    const int64_t* table, int64_t n_tensors, int64_t n_chunks, int64_t chunk, double lr,
    const float* lr_ptr, double beta1, double beta2, double eps, double weight_decay,
    int param_dtype, int grad_dtype, int state_dtype, bool decoupled, bool amsgrad,
    bool maximize, bool has_master, const float* inv_scale, const float* found_inf,
    const float* clip_coef, cudaStream_t stream) {
  if (n_tensors < 0 || n_chunks < 0 || chunk <= 0 || n_chunks > 0x7FFFFFFFll ||
      chunk > 0x7FFFFFFFll) {
    return cudaErrorInvalidValue;
  }
  const bool grad_ok = grad_dtype == param_dtype || grad_dtype == FASTTRAIN_DTYPE_FLOAT32;
  const bool state_ok =
      state_dtype == FASTTRAIN_DTYPE_FLOAT32 || state_dtype == FASTTRAIN_DTYPE_BFLOAT16;
  if (!grad_ok || !state_ok) {
    return cudaErrorInvalidValue;
  }
  if (n_tensors == 0) {
    return cudaSuccess;
  }
  const unsigned int step_blocks =
      static_cast<unsigned int>((n_tensors + kStepThreads - 1) / kStepThreads);
  step_increment_kernel<<<step_blocks, kStepThreads, 0, stream>>>(table, n_tensors, found_inf);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || n_chunks == 0) {
    return err;
  }

  Options o;
  o.lr = lr;
  o.lr_ptr = lr_ptr;
  o.beta1 = beta1;
  o.beta2 = beta2;
  o.eps = eps;
  o.weight_decay = weight_decay;
  o.decoupled = decoupled;
  o.amsgrad = amsgrad;
  o.maximize = maximize;
  o.inv_scale = inv_scale;
  o.found_inf = found_inf;
  o.clip_coef = clip_coef;

  const bool grad_fp32 = grad_dtype == FASTTRAIN_DTYPE_FLOAT32;
  switch (param_dtype) {
    case FASTTRAIN_DTYPE_FLOAT32:
      return launch_state<float, float>(state_dtype, has_master, table, n_tensors,
                                        n_chunks, chunk, o, stream);
    case FASTTRAIN_DTYPE_BFLOAT16:
      return grad_fp32 ? launch_state<__nv_bfloat16, float>(state_dtype, has_master,
                                                            table, n_tensors, n_chunks, chunk,
                                                            o, stream)
                       : launch_state<__nv_bfloat16, __nv_bfloat16>(
                             state_dtype, has_master, table, n_tensors, n_chunks,
                             chunk, o, stream);
    case FASTTRAIN_DTYPE_FLOAT16:
      return grad_fp32 ? launch_state<__half, float>(state_dtype, has_master, table,
                                                     n_tensors, n_chunks, chunk, o, stream)
                       : launch_state<__half, __half>(state_dtype, has_master, table,
                                                      n_tensors, n_chunks, chunk, o, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
