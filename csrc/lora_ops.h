// Declarations shared by the op registration (lora_ops.cpp) and the CUDA kernels (lora_*.cu).
//
// Every op validates its arguments with the check_* functions below (defined in lora_ops.cpp), so the CPU,
// CUDA and Meta implementations accept exactly the same inputs and fail with the same messages.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

// setup.py defines it as 1 for the build with CUDA kernels.
#ifndef LORA_KERNELS_WITH_CUDA
#define LORA_KERNELS_WITH_CUDA 0
#endif

namespace lora_kernels {

constexpr int64_t kMaxRank = 256;

// "shape [37, 70], dtype Half, device cpu, strides [70, 1]": for error messages.
std::string describe(const at::Tensor& t);

// Argument checks; each returns nothing and raises a c10::Error naming the bad argument.
void check_project_args(const at::Tensor& x, const at::Tensor& lora_A, double dropout_p,
                        const std::optional<at::Tensor>& seed);
void check_linear_fwd_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& t, const at::Tensor& lora_B);
void check_grad_t_and_B_args(const at::Tensor& grad_y, const at::Tensor& lora_B, const at::Tensor& t);
void check_grad_A_args(const at::Tensor& grad_t, const at::Tensor& x, double dropout_p,
                       const std::optional<at::Tensor>& seed);
void check_grad_x_args(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& grad_t,
                       const at::Tensor& lora_A, double dropout_p, const std::optional<at::Tensor>& seed);
void check_dropout_mask_args(at::IntArrayRef size, double dropout_p, const at::Tensor& seed);

// y = x·Wᵀ + b + s·(t·Bᵀ) from ATen GEMMs; the same code serves CPU and CUDA (cuBLAS there).
at::Tensor lora_linear_fwd_aten(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& t,
                                const at::Tensor& lora_B, double scaling);

#if LORA_KERNELS_WITH_CUDA
// The ops' CUDA kernels (lora_fwd.cu, lora_bwd.cu), registered in lora_ops.cpp beside the CPU and Meta ones.
namespace cuda {
at::Tensor lora_project_cuda(const at::Tensor& x, const at::Tensor& lora_A, double scaling, double dropout_p,
                             const std::optional<at::Tensor>& seed);
at::Tensor lora_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& t,
                                const at::Tensor& lora_B, double scaling);
std::tuple<at::Tensor, at::Tensor> lora_grad_t_and_B_cuda(const at::Tensor& grad_y, const at::Tensor& lora_B,
                                                          const at::Tensor& t, double scaling);
at::Tensor lora_grad_A_cuda(const at::Tensor& grad_t, const at::Tensor& x, double dropout_p,
                            const std::optional<at::Tensor>& seed);
at::Tensor lora_grad_x_cuda(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& grad_t,
                            const at::Tensor& lora_A, double dropout_p, const std::optional<at::Tensor>& seed);
at::Tensor lora_dropout_mask_cuda(at::IntArrayRef size, double dropout_p, const at::Tensor& seed);
}  // namespace cuda
#endif

}  // namespace lora_kernels
