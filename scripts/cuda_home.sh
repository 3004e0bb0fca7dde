# Sourced by scripts/compat_check.sh and bench/gpu_check.sh: export CUDA_HOME as the toolkit
# that holds the real nvcc (torch takes the folder above the first nvcc on PATH, and
# /usr/local/bin/nvcc may be a wrapper outside the toolkit, which has no headers there), put its
# bin/ first on PATH, and build for sm_90 only.
nvcc_path=$(command -v nvcc || true)
nvcc_home=""
[ -n "$nvcc_path" ] && nvcc_home=$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")
for home in "${CUDA_HOME:-}" /usr/local/cuda "$nvcc_home" /usr/local/cuda-*; do
  if [ -n "$home" ] && [ -f "$home/include/cuda_runtime.h" ] && [ -x "$home/bin/nvcc" ]; then
    export CUDA_HOME=$home PATH="$home/bin:$PATH"
    break
  fi
done
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
unset nvcc_path nvcc_home home
