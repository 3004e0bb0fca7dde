// torch-facing glue of the CUDA AdamW (fasttrain::adamw_cuda_): checks, device guard, current
// stream, and a check of the launcher's cudaError_t. The kernels are in adamw_cuda_kernel.cu,
// which includes no torch headers. Built only when torch has CUDA (see _ext_sources.py).

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <optional>

// Defined in adamw_cuda_kernel.cu; keep both declarations in sync.
#define FASTTRAIN_DTYPE_FLOAT32 0
#define FASTTRAIN_DTYPE_BFLOAT16 1
#define FASTTRAIN_DTYPE_FLOAT16 2

extern "C" cudaError_t fasttrain_adamw_cuda_launch(
    const int64_t* table, int64_t n_tensors, int64_t n_chunks, int64_t chunk, double lr,
    const float* lr_ptr, double beta1, double beta2, double eps, double weight_decay,
    int param_dtype, int grad_dtype, int state_dtype, bool decoupled, bool amsgrad,
    bool maximize, bool has_master, const float* inv_scale, const float* found_inf,
    const float* clip_coef, cudaStream_t stream);

namespace fasttrain {
namespace {

constexpr int64_t kTableRows = 8;

int dtype_code(at::ScalarType t, const char* what, bool allow_half) {
  switch (t) {
    case at::kFloat:
      return FASTTRAIN_DTYPE_FLOAT32;
    case at::kBFloat16:
      return FASTTRAIN_DTYPE_BFLOAT16;
    case at::kHalf:
      if (allow_half) {
        return FASTTRAIN_DTYPE_FLOAT16;
      }
      break;
    default:
      break;
  }
  TORCH_CHECK(false, "adamw_cuda_: unsupported ", what, " ", c10::toString(t),
              allow_half ? " (float32, bfloat16 or float16)" : " (float32 or bfloat16)");
  return -1;
}

// A 0-d or 1-element fp32 tensor on the table's device, or null.
const float* optional_scalar_ptr(const std::optional<at::Tensor>& t, const at::Tensor& table,
                                 const char* what) {
  if (!t.has_value() || !t->defined()) {
    return nullptr;
  }
  TORCH_CHECK(t->device() == table.device(), "adamw_cuda_: ", what, " must be on ",
              table.device(), ", got ", t->device());
  TORCH_CHECK(t->scalar_type() == at::kFloat, "adamw_cuda_: ", what, " must be float32, got ",
              c10::toString(t->scalar_type()));
  TORCH_CHECK(t->numel() == 1, "adamw_cuda_: ", what, " must have one element, got ",
              t->numel());
  return t->const_data_ptr<float>();
}

void adamw_cuda_(const at::Tensor& table, int64_t n_tensors, int64_t n_chunks, int64_t chunk,
                 double lr, const std::optional<at::Tensor>& lr_tensor, double beta1,
                 double beta2, double eps, double weight_decay, at::ScalarType param_dtype,
                 at::ScalarType grad_dtype, at::ScalarType state_dtype, bool decoupled,
                 bool amsgrad, bool maximize, bool has_master,
                 const std::optional<at::Tensor>& inv_scale,
                 const std::optional<at::Tensor>& found_inf,
                 const std::optional<at::Tensor>& clip_coef) {
  TORCH_CHECK(table.is_cuda(), "adamw_cuda_: table must be a CUDA tensor, got one on ",
              table.device());
  TORCH_CHECK(table.scalar_type() == at::kLong, "adamw_cuda_: table must be int64, got ",
              c10::toString(table.scalar_type()));
  TORCH_CHECK(table.is_contiguous(), "adamw_cuda_: table must be contiguous");
  TORCH_CHECK(n_tensors >= 0 && n_chunks >= 0, "adamw_cuda_: n_tensors and n_chunks must be "
              ">= 0, got ", n_tensors, " and ", n_chunks);
  TORCH_CHECK(n_tensors < (int64_t{1} << 31), "adamw_cuda_: too many tensors: ", n_tensors);
  TORCH_CHECK(n_chunks <= 0x7FFFFFFF, "adamw_cuda_: too many chunks for one launch: ", n_chunks);
  TORCH_CHECK(chunk > 0 && chunk <= 0x7FFFFFFF, "adamw_cuda_: chunk must be in [1, 2^31), got ",
              chunk);
  TORCH_CHECK(table.numel() >= kTableRows * n_tensors + n_chunks, "adamw_cuda_: table has ",
              table.numel(), " entries, expected at least ", kTableRows * n_tensors + n_chunks,
              " (8 rows of ", n_tensors, " tensors + ", n_chunks, " chunks)");
  const int param_code = dtype_code(param_dtype, "param dtype", /*allow_half=*/true);
  const int grad_code = dtype_code(grad_dtype, "grad dtype", /*allow_half=*/true);
  const int state_code = dtype_code(state_dtype, "state dtype", /*allow_half=*/false);
  TORCH_CHECK(grad_dtype == param_dtype || grad_dtype == at::kFloat,
              "adamw_cuda_: grads must have the param dtype (", c10::toString(param_dtype),
              ") or float32, got ", c10::toString(grad_dtype));

  const float* lr_ptr = optional_scalar_ptr(lr_tensor, table, "lr_tensor");
  const float* inv_scale_ptr = optional_scalar_ptr(inv_scale, table, "inv_scale");
  const float* found_inf_ptr = optional_scalar_ptr(found_inf, table, "found_inf");
  const float* clip_coef_ptr = optional_scalar_ptr(clip_coef, table, "clip_coef");
  if (n_tensors == 0) {
    return;
  }

  const c10::cuda::CUDAGuard device_guard(table.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(table.device().index()).stream();
  const cudaError_t err = fasttrain_adamw_cuda_launch(
      table.const_data_ptr<int64_t>(), n_tensors, n_chunks, chunk, lr, lr_ptr, beta1, beta2, eps,
      weight_decay, param_code, grad_code, state_code, decoupled, amsgrad, maximize, has_master,
      inv_scale_ptr, found_inf_ptr, clip_coef_ptr, stream);
  TORCH_CHECK(err == cudaSuccess, "adamw_cuda_: kernel launch failed: ",
              cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttrain, CUDA, m) { m.impl("adamw_cuda_", &adamw_cuda_); }

}  // namespace fasttrain
