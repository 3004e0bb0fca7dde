// Multi-tensor AdamW and sum of squares on the CPU: OpenMP threads + SIMD loops.
//
// fasttrain::adamw_cpu_ updates every tensor of a parameter group in one parallel region. The
// elements of all tensors are laid end to end and cut into fixed chunks of kChunkElements; the
// threads claim chunks in order, and for each piece of a tensor inside its chunk run one
// branch-free vectorized loop (a template instance per dtype combination and option set).
// Per-tensor scalars (step, bias corrections) are computed before, once per tensor. One pass
// over memory: 28 B/param for fp32.
//
// Numerics: fp32 math in the order of torch's CPU kernels, which fuse the multiply-add in lerp,
// addcmul and add(alpha=), and compute addcdiv as self + (value * t1) / t2; bias corrections in
// double as Python computes them. This file is built with -ffp-contract=off so that the only
// fused multiply-adds are the explicit std::fma calls. fp32 results then equal torch's fused CPU
// AdamW bit for bit in its vectorized loop (the scalar tail of each tensor, its last few
// elements, can differ by an ulp); torch's foreach=False path differs by an ulp here and there
// because its CPU sqrt (MKL VML) is not always correctly rounded.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace fasttrain {

using TensorPtrs = c10::ArrayRef<const at::Tensor*>;

namespace {

using bf16_bits = uint16_t;  // bf16 values are handled as raw bits

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

inline float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

inline float to_float(float x) { return x; }
inline float to_float(bf16_bits b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// fp32 -> bf16 bits: round to nearest even; NaN stays a (quiet) NaN of the same sign.
inline bf16_bits bf16_round_nearest(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan_bits = (u >> 16) | 0x40u;
  return static_cast<bf16_bits>(x != x ? nan_bits : rounded);
}

// fp32 -> bf16 bits, rounding up with probability (dropped bits) / 2^16; noise in [0, 2^16).
inline bf16_bits bf16_round_stochastic(float x, uint32_t noise) {
  const uint32_t u = float_bits(x);
  const uint32_t rounded = (u + noise) >> 16;
  const uint32_t nan_bits = (u >> 16) | 0x40u;
  return static_cast<bf16_bits>(x != x ? nan_bits : rounded);
}

inline void store(float* p, float x) { *p = x; }
inline void store(bf16_bits* p, float x) { *p = bf16_round_nearest(x); }

// Counter-based noise for stochastic rounding: a 32-bit integer hash (murmur3's finalizer) of
// the element index mixed with a per-(seed, step, tensor) key. Vectorizes (32-bit multiplies).
inline uint32_t element_noise(uint32_t key, int64_t index) {
  uint32_t x = static_cast<uint32_t>(index) ^ key;
  x ^= static_cast<uint32_t>(static_cast<uint64_t>(index) >> 32) * 0x27D4EB2Du;
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x & 0xFFFFu;
}

inline uint32_t tensor_key(int64_t seed, double step, int64_t tensor_index) {
  // splitmix64 over (seed, step, tensor index).
  uint64_t z = static_cast<uint64_t>(seed) * 0x9E3779B97F4A7C15ull;
  z ^= static_cast<uint64_t>(step) * 0xBF58476D1CE4E5B9ull;
  z ^= static_cast<uint64_t>(tensor_index) * 0x94D049BB133111EBull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z ^ (z >> 32));
}

// Scalars shared by every tensor of one call (fp32 as torch casts its Python-float scalars).
struct Hyper {
  float grad_mul_scale;  // inv_scale or 1
  bool store_grad;       // with inv_scale: the unscaled grad is written back (torch's fused do)
  float grad_mul_clip;   // clip_coef or 1
  float grad_sign;       // -1 for maximize, else 1
  float weight_decay;    // L2 coefficient (Adam)
  float decay;           // 1 - lr * weight_decay (AdamW)
  float lerp_coef;       // w = 1 - beta1 if w < 0.5, else w - 1 (torch's vectorized lerp)
  bool lerp_small;       // w < 0.5
  float beta2;
  float one_minus_beta2;
  float eps;
};

// One tensor: pointers, size and its own scalars.
struct Job;
using UpdateFn = void (*)(const Job&, const Hyper&, int64_t, int64_t);

struct Job {
  void* param;
  void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  float* master;
  int64_t numel;
  float neg_step_size;  // -(lr / (1 - beta1^step))
  float bc2_sqrt;       // sqrt(1 - beta2^step)
  uint32_t noise_key;
  UpdateFn update;
};

enum class Mode { kPlain, kMaster, kStochastic };

// Updates elements [begin, end) of one tensor. P/G/S: float or bf16_bits for the param, the
// grad and the optimizer states. No branches in the loop body: the selects below are uniform
// and compile to blends.
template <typename P, typename G, typename S, bool kDecoupled, bool kAmsgrad, Mode kMode>
void update_range(const Job& job, const Hyper& h, int64_t begin, int64_t end) {
  P* __restrict param = static_cast<P*>(job.param);
  G* __restrict grad = static_cast<G*>(job.grad);
  S* __restrict exp_avg = static_cast<S*>(job.exp_avg);
  S* __restrict exp_avg_sq = static_cast<S*>(job.exp_avg_sq);
  S* __restrict max_exp_avg_sq = static_cast<S*>(job.max_exp_avg_sq);
  float* __restrict master = job.master;

  const float grad_mul_scale = h.grad_mul_scale, grad_mul_clip = h.grad_mul_clip;
  const bool store_grad = h.store_grad;
  const float grad_sign = h.grad_sign, weight_decay = h.weight_decay, decay = h.decay;
  const float lerp_coef = h.lerp_coef;
  // lerp base: m if w < 0.5 else g, as a bit mask (a select on a bool does not vectorize).
  const uint32_t lerp_m_mask = h.lerp_small ? 0xFFFFFFFFu : 0u;
  const float beta2 = h.beta2, one_minus_beta2 = h.one_minus_beta2, eps = h.eps;
  const float neg_step_size = job.neg_step_size, bc2_sqrt = job.bc2_sqrt;
  const uint32_t noise_key = job.noise_key;

#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float g = to_float(grad[i]);
    g = g * grad_mul_scale;  // multiplying by 1 or -1 is exact
    if (store_grad) {
      store(&grad[i], g);
    }
    g = g * grad_mul_clip;
    g = g * grad_sign;
    float p;
    if constexpr (kMode == Mode::kMaster) {
      p = master[i];
    } else {
      p = to_float(param[i]);
    }
    if constexpr (kDecoupled) {
      p = p * decay;
    } else {
      g = std::fma(weight_decay, p, g);
    }
    float m = to_float(exp_avg[i]);
    const float lerp_base =
        bits_float((float_bits(m) & lerp_m_mask) | (float_bits(g) & ~lerp_m_mask));
    m = std::fma(lerp_coef, g - m, lerp_base);
    float v = to_float(exp_avg_sq[i]);
    v = std::fma(one_minus_beta2 * g, g, v * beta2);
    float v_hat = v;
    if constexpr (kAmsgrad) {
      float v_max = to_float(max_exp_avg_sq[i]);
      v_max = (v_max > v || v_max != v_max) ? v_max : v;  // torch.maximum: NaN propagates
      store(&max_exp_avg_sq[i], v_max);
      v_hat = v_max;
    }
    const float denom = std::sqrt(v_hat) / bc2_sqrt + eps;
    p = p + (neg_step_size * m) / denom;
    store(&exp_avg[i], m);
    store(&exp_avg_sq[i], v);
    if constexpr (kMode == Mode::kMaster) {
      master[i] = p;
      store(&param[i], p);
    } else if constexpr (kMode == Mode::kStochastic) {
      param[i] = bf16_round_stochastic(p, element_noise(noise_key, i));
    } else {
      store(&param[i], p);
    }
  }
}

template <typename P, typename G, typename S, bool kDecoupled, bool kAmsgrad>
UpdateFn pick_mode(Mode mode) {
  switch (mode) {
    case Mode::kMaster:
      return &update_range<P, G, S, kDecoupled, kAmsgrad, Mode::kMaster>;
    case Mode::kStochastic:
      if constexpr (std::is_same_v<P, bf16_bits>) {
        return &update_range<P, G, S, kDecoupled, kAmsgrad, Mode::kStochastic>;
      }
      [[fallthrough]];
    default:
      return &update_range<P, G, S, kDecoupled, kAmsgrad, Mode::kPlain>;
  }
}

template <typename P, typename G, typename S>
UpdateFn pick_flags(bool decoupled, bool amsgrad, Mode mode) {
  if (decoupled) {
    return amsgrad ? pick_mode<P, G, S, true, true>(mode) : pick_mode<P, G, S, true, false>(mode);
  }
  return amsgrad ? pick_mode<P, G, S, false, true>(mode) : pick_mode<P, G, S, false, false>(mode);
}

template <typename P, typename G>
UpdateFn pick_state(bool state_bf16, bool decoupled, bool amsgrad, Mode mode) {
  return state_bf16 ? pick_flags<P, G, bf16_bits>(decoupled, amsgrad, mode)
                    : pick_flags<P, G, float>(decoupled, amsgrad, mode);
}

UpdateFn pick_update(at::ScalarType param, at::ScalarType grad, at::ScalarType state,
                     bool decoupled, bool amsgrad, Mode mode) {
  const bool state_bf16 = state == at::kBFloat16;
  if (param == at::kFloat) {
    return pick_state<float, float>(state_bf16, decoupled, amsgrad, mode);
  }
  if (grad == at::kFloat) {
    return pick_state<bf16_bits, float>(state_bf16, decoupled, amsgrad, mode);
  }
  return pick_state<bf16_bits, bf16_bits>(state_bf16, decoupled, amsgrad, mode);
}

const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

// A list of tensors seen through pointers: the op (at::TensorList) and the pybind11 fast path
// (Python lists unpacked without reference counting) share one implementation.
class Tensors {
 public:
  explicit Tensors(TensorPtrs ptrs) : ptrs_(ptrs) {}
  size_t size() const { return ptrs_.size(); }
  bool empty() const { return ptrs_.empty(); }
  const at::Tensor& operator[](size_t i) const { return *ptrs_[i]; }

 private:
  TensorPtrs ptrs_;
};

std::vector<const at::Tensor*> pointers(at::TensorList list) {
  std::vector<const at::Tensor*> out(list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    out[i] = &list[i];
  }
  return out;
}

// The kernel updates every tensor as a flat array: each must fill its memory span (contiguous,
// or in another memory format such as channels_last), and a param's grad and states must lay
// their elements out in the param's order (both contiguous, or the param's strides).
void check_dense_cpu(const at::Tensor& t, const char* what, size_t i,
                     const at::Tensor* param = nullptr) {
  TORCH_CHECK(t.defined(), "adamw_cpu_: ", what, "[", i, "] is undefined");
  TORCH_CHECK(t.device().is_cpu(), "adamw_cpu_: ", what, "[", i,
              "] must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, "adamw_cpu_: ", what, "[", i,
              "] must be a dense (strided) tensor");
  TORCH_CHECK(t.is_non_overlapping_and_dense(), "adamw_cpu_: ", what, "[", i,
              "] must be contiguous or in another dense memory format (channels_last)");
  if (param != nullptr) {
    TORCH_CHECK((t.is_contiguous() && param->is_contiguous()) || t.strides() == param->strides(),
                "adamw_cpu_: ", what, "[", i, "] has strides ", t.strides(), ", params[", i,
                "] has ", param->strides(), ": both must be contiguous or have the same strides");
  }
}

void check_list_len(const Tensors& list, size_t n, const char* what) {
  TORCH_CHECK(list.size() == n, "adamw_cpu_: expected ", n, " ", what, " (one per param), got ",
              list.size());
}

// A 0-d or 1-element fp32 CPU tensor (grad scaler / clipping scalars); returns its value.
float optional_scalar(const at::Tensor* t, const char* what, float absent) {
  if (t == nullptr || !t->defined()) {
    return absent;
  }
  TORCH_CHECK(t->device().is_cpu(), "adamw_cpu_: ", what, " must be a CPU tensor, got one on ",
              t->device());
  TORCH_CHECK(t->scalar_type() == at::kFloat, "adamw_cpu_: ", what, " must be float32, got ",
              dtype_name(t->scalar_type()));
  TORCH_CHECK(t->numel() == 1, "adamw_cpu_: ", what, " must have one element, got ",
              t->numel());
  return *t->data_ptr<float>();
}

// The checks of the i-th tensor of every list (TORCH_CHECK: throws c10::Error).
void check_tensor(size_t i, const Tensors& params, const Tensors& grads, const Tensors& exp_avgs,
                  const Tensors& exp_avg_sqs, const Tensors& max_exp_avg_sqs,
                  const Tensors& masters, const Tensors& steps, bool amsgrad, bool has_master) {
  const at::Tensor& p = params[i];
  check_dense_cpu(p, "params", i);
  const at::ScalarType pt = p.scalar_type();
  TORCH_CHECK(pt == at::kFloat || pt == at::kBFloat16, "adamw_cpu_: params[", i,
              "] must be float32 or bfloat16, got ", dtype_name(pt));
  const int64_t numel = p.numel();
  check_dense_cpu(grads[i], "grads", i, &p);
  const at::ScalarType gt = grads[i].scalar_type();
  TORCH_CHECK(gt == pt || gt == at::kFloat, "adamw_cpu_: grads[", i,
              "] must have the param's dtype (", dtype_name(pt), ") or float32, got ",
              dtype_name(gt));
  TORCH_CHECK(grads[i].numel() == numel, "adamw_cpu_: grads[", i, "] has ", grads[i].numel(),
              " elements, params[", i, "] has ", numel);
  check_dense_cpu(exp_avgs[i], "exp_avgs", i, &p);
  const at::ScalarType st = exp_avgs[i].scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16, "adamw_cpu_: exp_avgs[", i,
              "] must be float32 or bfloat16, got ", dtype_name(st));
  TORCH_CHECK(exp_avgs[i].numel() == numel, "adamw_cpu_: exp_avgs[", i, "] has ",
              exp_avgs[i].numel(), " elements, params[", i, "] has ", numel);
  check_dense_cpu(exp_avg_sqs[i], "exp_avg_sqs", i, &p);
  TORCH_CHECK(exp_avg_sqs[i].scalar_type() == st, "adamw_cpu_: exp_avg_sqs[", i,
              "] must have the dtype of exp_avgs[", i, "] (", dtype_name(st), "), got ",
              dtype_name(exp_avg_sqs[i].scalar_type()));
  TORCH_CHECK(exp_avg_sqs[i].numel() == numel, "adamw_cpu_: exp_avg_sqs[", i, "] has ",
              exp_avg_sqs[i].numel(), " elements, params[", i, "] has ", numel);
  if (amsgrad) {
    check_dense_cpu(max_exp_avg_sqs[i], "max_exp_avg_sqs", i, &p);
    TORCH_CHECK(max_exp_avg_sqs[i].scalar_type() == st, "adamw_cpu_: max_exp_avg_sqs[", i,
                "] must have the dtype of exp_avgs[", i, "] (", dtype_name(st), "), got ",
                dtype_name(max_exp_avg_sqs[i].scalar_type()));
    TORCH_CHECK(max_exp_avg_sqs[i].numel() == numel, "adamw_cpu_: max_exp_avg_sqs[", i,
                "] has ", max_exp_avg_sqs[i].numel(), " elements, params[", i, "] has ",
                numel);
  }
  if (has_master) {
    check_dense_cpu(masters[i], "masters", i, &p);
    TORCH_CHECK(masters[i].scalar_type() == at::kFloat, "adamw_cpu_: masters[", i,
                "] must be float32, got ", dtype_name(masters[i].scalar_type()));
    TORCH_CHECK(masters[i].numel() == numel, "adamw_cpu_: masters[", i, "] has ",
                masters[i].numel(), " elements, params[", i, "] has ", numel);
  }
  const at::Tensor& s = steps[i];
  TORCH_CHECK(s.defined() && s.device().is_cpu() && s.layout() == at::kStrided,
              "adamw_cpu_: steps[", i, "] must be a dense CPU tensor");
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.numel() == 1, "adamw_cpu_: steps[", i,
              "] must be a float32 tensor with one element, got ", dtype_name(s.scalar_type()),
              " with ", s.numel(), " elements");
}

constexpr int64_t kChunkElements = 65536;  // unit of work of the update
constexpr int64_t kSetupGrain = 512;       // tensors per task in the per-tensor set-up

}  // namespace

// fasttrain::adamw_cpu_ on lists of tensor pointers; called by the op below and by the pybind11
// fast path in bindings.cpp. Optional scalars are null when absent.
void adamw_cpu_refs(TensorPtrs params_, TensorPtrs grads_, TensorPtrs exp_avgs_,
                    TensorPtrs exp_avg_sqs_, TensorPtrs max_exp_avg_sqs_, TensorPtrs masters_,
                    TensorPtrs steps_, double lr, double beta1, double beta2, double eps,
                    double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                    bool stochastic, int64_t seed, const at::Tensor* inv_scale,
                    const at::Tensor* found_inf, const at::Tensor* clip_coef) {
  const Tensors params(params_), grads(grads_), exp_avgs(exp_avgs_);
  const Tensors exp_avg_sqs(exp_avg_sqs_), max_exp_avg_sqs(max_exp_avg_sqs_);
  const Tensors masters(masters_), steps(steps_);
  const size_t n = params.size();
  check_list_len(grads, n, "grads");
  check_list_len(exp_avgs, n, "exp_avgs");
  check_list_len(exp_avg_sqs, n, "exp_avg_sqs");
  check_list_len(steps, n, "steps");
  if (amsgrad) {
    check_list_len(max_exp_avg_sqs, n, "max_exp_avg_sqs (amsgrad=True)");
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty(),
                "adamw_cpu_: max_exp_avg_sqs must be empty when amsgrad=False");
  }
  const bool has_master = !masters.empty();
  if (has_master) {
    check_list_len(masters, n, "masters (or none)");
  }
  // Validate everything before touching any memory. In parallel: with thousands of small
  // tensors, reading their metadata (cold after a backward pass) is a good part of the step.
  // A tensor that does not fit is found again serially, for the error of the first one (and
  // any exception on the calling thread).
  std::atomic<bool> misfit{false};
  const auto check = [&](size_t i) {
    check_tensor(i, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps,
                 amsgrad, has_master);
  };
  at::parallel_for(0, static_cast<int64_t>(n), kSetupGrain, [&](int64_t first, int64_t last) {
    try {
      for (int64_t i = first; i < last; ++i) {
        check(static_cast<size_t>(i));
      }
    } catch (...) {  // found again, and thrown, on this thread
      misfit.store(true, std::memory_order_relaxed);
    }
  });
  if (misfit.load()) {
    for (size_t i = 0; i < n; ++i) {
      check(i);
    }
  }
  const float grad_mul_scale = optional_scalar(inv_scale, "inv_scale", 1.0f);
  const float grad_mul_clip = optional_scalar(clip_coef, "clip_coef", 1.0f);
  const float found = optional_scalar(found_inf, "found_inf", 0.0f);
  if (found != 0.0f) {
    return;  // the grad scaler skips this step: no update, no step increment
  }

  Hyper h;
  h.grad_mul_scale = grad_mul_scale;
  h.store_grad = inv_scale != nullptr;
  h.grad_mul_clip = grad_mul_clip;
  h.grad_sign = maximize ? -1.0f : 1.0f;
  h.weight_decay = static_cast<float>(weight_decay);
  h.decay = static_cast<float>(1.0 - lr * weight_decay);
  const float w = static_cast<float>(1.0 - beta1);
  h.lerp_small = std::abs(w) < 0.5f;
  h.lerp_coef = h.lerp_small ? w : w - 1.0f;
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.eps = static_cast<float>(eps);
  // With weight_decay == 0 torch skips the decay entirely; decay == 1 is exact, but the L2
  // form g + 0 * p would turn an inf param into NaN, so use the decoupled form then.
  const bool use_decoupled = decoupled || weight_decay == 0.0;

  // Offsets of the tensors in the joint element space (their numels laid end to end).
  std::vector<int64_t> offsets(n + 1, 0);
  for (size_t i = 0; i < n; ++i) {
    offsets[i + 1] = offsets[i] + params[i].numel();
  }
  const int64_t total = offsets[n];

  // Per-tensor set-up (step += 1, bias corrections, pointers, kernel), split over the threads:
  // with thousands of small tensors it is a good part of the time.
  std::vector<Job> jobs(n);
  at::parallel_for(0, static_cast<int64_t>(n), kSetupGrain, [&](int64_t first, int64_t last) {
    double cached_step = -1.0, cached_neg_step_size = 0.0, cached_bc2_sqrt = 0.0;
    for (int64_t i = first; i < last; ++i) {
      float* step_ptr = steps[i].data_ptr<float>();
      *step_ptr += 1.0f;
      const double step = static_cast<double>(*step_ptr);
      if (step != cached_step) {  // steps usually agree: compute the bias corrections once
        const double bc1 = 1.0 - std::pow(beta1, step);
        const double bc2 = 1.0 - std::pow(beta2, step);
        cached_neg_step_size = -(lr / bc1);
        cached_bc2_sqrt = std::pow(bc2, 0.5);  // Python's bc2 ** 0.5
        cached_step = step;
      }
      Job& job = jobs[i];
      const at::Tensor& p = params[i];
      job.param = p.data_ptr();
      job.grad = grads[i].data_ptr();
      job.exp_avg = exp_avgs[i].data_ptr();
      job.exp_avg_sq = exp_avg_sqs[i].data_ptr();
      job.max_exp_avg_sq = amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr;
      job.master = has_master ? masters[i].data_ptr<float>() : nullptr;
      job.numel = offsets[i + 1] - offsets[i];
      job.neg_step_size = static_cast<float>(cached_neg_step_size);
      job.bc2_sqrt = static_cast<float>(cached_bc2_sqrt);
      const at::ScalarType pt = p.scalar_type();
      Mode mode = Mode::kPlain;
      if (has_master) {
        mode = Mode::kMaster;
      } else if (stochastic && pt == at::kBFloat16) {
        mode = Mode::kStochastic;
        job.noise_key = tensor_key(seed, step, i);
      }
      job.update = pick_update(pt, grads[i].scalar_type(), exp_avgs[i].scalar_type(),
                               use_decoupled, amsgrad, mode);
    }
  });
  if (total == 0) {
    return;
  }

  // The update: fixed chunks of kChunkElements of the joint element space (a chunk may span
  // several small tensors, a big tensor spans many chunks), claimed in order by the threads of
  // one parallel region. Claiming (rather than a static split) keeps both cores busy when one
  // of them is slowed down; the result does not depend on who updates what.
  const int64_t n_chunks = (total + kChunkElements - 1) / kChunkElements;
  const int64_t n_workers = std::min<int64_t>(at::get_num_threads(), n_chunks);
  std::atomic<int64_t> next_chunk{0};
  at::parallel_for(0, n_workers, 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t chunk = next_chunk.fetch_add(1, std::memory_order_relaxed);
      if (chunk >= n_chunks) {
        break;
      }
      const int64_t begin = chunk * kChunkElements;
      const int64_t end = std::min(total, begin + kChunkElements);
      size_t t = static_cast<size_t>(
          std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1);
      for (int64_t pos = begin; pos < end; ++t) {
        const int64_t lo = pos - offsets[t];
        const int64_t hi = std::min(end, offsets[t + 1]) - offsets[t];
        if (hi > lo) {
          jobs[t].update(jobs[t], h, lo, hi);
        }
        pos = offsets[t] + hi;
      }
    }
  });
}

namespace {

// Sum of squares over fixed chunks of each tensor, each chunk accumulated in double, chunks
// added in a fixed order: the result does not depend on the number of threads.
constexpr int64_t kSumSqChunk = 16384;

template <typename T>
double chunk_sum_sq(const T* __restrict x, int64_t begin, int64_t end) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = begin; i < end; ++i) {
    const double v = static_cast<double>(to_float(x[i]));
    acc += v * v;
  }
  return acc;
}

}  // namespace

// fasttrain::sum_sq_cpu on a list of tensor pointers (the op and the pybind11 fast path).
at::Tensor sum_sq_cpu_refs(TensorPtrs tensors_) {
  const Tensors tensors(tensors_);
  const size_t n = tensors.size();
  std::vector<int64_t> chunk_offsets(n + 1, 0);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined() && t.device().is_cpu() && t.layout() == at::kStrided,
                "sum_sq_cpu: tensors[", i, "] must be a dense CPU tensor");
    TORCH_CHECK(t.is_non_overlapping_and_dense(), "sum_sq_cpu: tensors[", i,
                "] must be contiguous or in another dense memory format (channels_last)");
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
                "sum_sq_cpu: tensors[", i, "] must be float32 or bfloat16, got ",
                dtype_name(t.scalar_type()));
    chunk_offsets[i + 1] = chunk_offsets[i] + (t.numel() + kSumSqChunk - 1) / kSumSqChunk;
  }
  const int64_t n_chunks = chunk_offsets[n];
  std::vector<double> partials(static_cast<size_t>(n_chunks), 0.0);
  // ~4 chunks (64K elements) per task at least, so small inputs stay on one thread.
  at::parallel_for(0, n_chunks, 4, [&](int64_t begin, int64_t end) {
    size_t t = static_cast<size_t>(
        std::upper_bound(chunk_offsets.begin(), chunk_offsets.end(), begin) -
        chunk_offsets.begin() - 1);
    for (int64_t c = begin; c < end; ++c) {
      while (c >= chunk_offsets[t + 1]) {
        ++t;
      }
      const at::Tensor& x = tensors[t];
      const int64_t lo = (c - chunk_offsets[t]) * kSumSqChunk;
      const int64_t hi = std::min(lo + kSumSqChunk, x.numel());
      partials[static_cast<size_t>(c)] =
          x.scalar_type() == at::kFloat
              ? chunk_sum_sq(static_cast<const float*>(x.data_ptr()), lo, hi)
              : chunk_sum_sq(static_cast<const bf16_bits*>(x.data_ptr()), lo, hi);
    }
  });
  double total = 0.0;
  for (double p : partials) {
    total += p;
  }
  // fp64 out: the squares of GradScaler-scaled grads can pass the fp32 range
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble).device(at::kCPU));
}

// CompositeExplicitAutograd rather than CPU: the dispatcher finds no CPU key in empty tensor
// lists (an empty group is then a no-op, not a NotImplementedError), and tensors of any other
// device reach the TORCH_CHECKs above and get a clear error.
namespace {

// The ops (schemas in bindings.cpp).
void adamw_cpu_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                at::TensorList masters, at::TensorList steps, double lr, double beta1,
                double beta2, double eps, double weight_decay, bool decoupled, bool amsgrad,
                bool maximize, bool stochastic, int64_t seed,
                const std::optional<at::Tensor>& inv_scale,
                const std::optional<at::Tensor>& found_inf,
                const std::optional<at::Tensor>& clip_coef) {
  auto opt = [](const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; };
  adamw_cpu_refs(pointers(params), pointers(grads), pointers(exp_avgs), pointers(exp_avg_sqs),
                 pointers(max_exp_avg_sqs), pointers(masters), pointers(steps), lr, beta1, beta2,
                 eps, weight_decay, decoupled, amsgrad, maximize, stochastic, seed,
                 opt(inv_scale), opt(found_inf), opt(clip_coef));
}

at::Tensor sum_sq_cpu(at::TensorList tensors) { return sum_sq_cpu_refs(pointers(tensors)); }

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CompositeExplicitAutograd, m) {
  m.impl("adamw_cpu_", &adamw_cpu_);
  m.impl("sum_sq_cpu", &sum_sq_cpu);
}

}  // namespace fasttrain
