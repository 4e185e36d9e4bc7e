// Host-side helpers shared by the CUDA launchers of lora_fwd.cu and lora_bwd.cu.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "lora_kernels.cuh"
#include "lora_ops.h"
#include "philox.h"

namespace lora_kernels {
namespace cuda {

// Enough blocks to fill the GPU about twice over.
inline int64_t target_blocks() {
  return 2 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

// The seed tensor's device pointer for DropoutParams (the ops' argument checks made sure it is an int64
// tensor on the input's device when dropout_p > 0), nullptr without dropout (then it is never read).
inline const int64_t* seed_pointer(double dropout_p, const std::optional<at::Tensor>& seed) {
  return dropout_p > 0.0 ? seed->const_data_ptr<int64_t>() : nullptr;
}

// Float16, bfloat16 and float32 only: the ops reject float64 before dispatch, so AT_DISPATCH_FLOATING_TYPES_AND2
// would compile a fourth, unreachable copy of every kernel (about a quarter more build time).
#define LORA_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)                \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                    \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

// Reduce a (parts, ...) float32 workspace into `out` (contiguous, any compute dtype), scaled.
inline void sum_partials(const at::Tensor& partial, const at::Tensor& out, float scale) {
  const int64_t parts = partial.size(0);
  const int64_t len = out.numel();
  if (len == 0) {
    return;
  }
  const int64_t blocks = std::min(ceil_div(len, kThreads), 4 * target_blocks());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  LORA_DISPATCH_FLOATING_TYPES(out.scalar_type(), "lora_sum_partials", [&] {
    sum_partials_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        partial.const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(), parts, len, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace lora_kernels
