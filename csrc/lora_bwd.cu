// CUDA backward: grad_t = s·(dY·B) and dB = dYᵀ·t from one read of dY, dA = grad_tᵀ·dropout(x), and
// dX = dropout'(grad_t·A) + dY·W (the LoRA term written first, dY·W accumulated into it by cuBLAS). grad_t is the gradient reaching t, already scaled by s, in dY's dtype.
// The kernels, and why each exists, are in lora_kernels.cuh; this file plans and launches them (they are
// registered in lora_ops.cpp).

#include "lora_cuda_common.cuh"

namespace lora_kernels {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> lora_grad_t_and_B_cuda(const at::Tensor& grad_y, const at::Tensor& lora_B,
                                                          const at::Tensor& t, double scaling) {
  check_grad_t_and_B_args(grad_y, lora_B, t);
  const c10::cuda::CUDAGuard device_guard(grad_y.device());
  const int64_t M = grad_y.size(0);
  const int64_t N = grad_y.size(1);
  const int64_t r = lora_B.size(1);
  const auto float_options = grad_y.options().dtype(at::kFloat);
  at::Tensor grad_t = at::empty({M, r}, grad_y.options());
  if (M == 0 || N == 0) {
    return {grad_t.zero_(), at::zeros({N, r}, float_options)};
  }
  const at::Tensor B = lora_B.to(grad_y.scalar_type()).contiguous();
  const at::Tensor t_c = t.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor grad_B;

  LORA_DISPATCH_FLOATING_TYPES(grad_y.scalar_type(), "lora_grad_t_and_B_cuda", [&] {
    dispatch_rank_tile(r, [&](auto rank_tile) {
      constexpr int RP = decltype(rank_tile)::value;
      using Tile = GradTBTile<RP>;
      const GradTBPlan plan = plan_grad_t_and_B<RP>(M, N, r, target_blocks());
      at::Tensor grad_t_partial = at::empty({plan.n_splits, M, r}, float_options);
      at::Tensor grad_B_partial = at::zeros({plan.groups, N, r}, float_options);
      const dim3 grid(static_cast<unsigned>(plan.groups), static_cast<unsigned>(plan.n_splits));
      lora_grad_t_and_B_kernel<scalar_t, Tile::BM, Tile::BN, RP, Tile::TX><<<grid, kThreads, 0, stream>>>(
          grad_y.const_data_ptr<scalar_t>(), grad_y.stride(0), grad_y.stride(1), B.const_data_ptr<scalar_t>(),
          t_c.const_data_ptr<float>(), grad_t_partial.mutable_data_ptr<float>(),
          grad_B_partial.mutable_data_ptr<float>(), M, N, r, plan.tiles_per_group, plan.n_per_split);
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      // The reduce also applies s and casts grad_t to dY's dtype (one pass over (M, r), even unsplit).
      sum_partials(grad_t_partial, grad_t, static_cast<float>(scaling));
      if (plan.groups == 1) {
        grad_B = grad_B_partial.view({N, r});
      } else {
        grad_B = at::empty({N, r}, float_options);
        sum_partials(grad_B_partial, grad_B, 1.0f);
      }
    });
  });
  return {grad_t, grad_B};
}

at::Tensor lora_grad_A_cuda(const at::Tensor& grad_t, const at::Tensor& x, double dropout_p,
                            const std::optional<at::Tensor>& seed) {
  check_grad_A_args(grad_t, x, dropout_p, seed);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t M = x.size(0);
  const int64_t K = x.size(1);
  const int64_t r = grad_t.size(1);
  if (dropout_p == 0.0 || M == 0 || K == 0) {
    // No mask to fuse: one cuBLAS GEMM in x.dtype with fp32 accumulation (an empty M gives zeros).
    return at::mm(grad_t.t(), x).to(at::kFloat);
  }
  const at::Tensor g = grad_t.contiguous();
  at::Tensor grad_A = at::empty({r, K}, x.options().dtype(at::kFloat));
  const DropoutParams dropout = make_dropout_params(dropout_p, seed_pointer(dropout_p, seed));
  const float scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  LORA_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lora_grad_A_cuda", [&] {
    dispatch_rank_tile(r, [&](auto rank_tile) {
      constexpr int RP = decltype(rank_tile)::value;
      using Tile = GradATile<RP>;
      const GradAPlan plan = plan_grad_A<RP>(M, K, r, target_blocks());
      TORCH_CHECK(plan.k_tiles <= std::numeric_limits<int32_t>::max(), "lora_grad_A: x is too wide, got ",
                  describe(x));
      at::Tensor partial = plan.groups == 1 ? grad_A : at::empty({plan.groups, r, K}, grad_A.options());
      const dim3 grid(static_cast<unsigned>(plan.k_tiles), static_cast<unsigned>(plan.groups));
      lora_grad_A_kernel<scalar_t, Tile::BMC, Tile::BK, RP, Tile::TY><<<grid, kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1),
          partial.mutable_data_ptr<float>(), M, K, r, plan.rows_per_group, scale, dropout);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (plan.groups > 1) {
        sum_partials(partial, grad_A, 1.0f);
      }
    });
  });
  return grad_A;
}

at::Tensor lora_grad_x_cuda(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& grad_t,
                            const at::Tensor& lora_A, double dropout_p,
                            const std::optional<at::Tensor>& seed) {
  check_grad_x_args(grad_y, weight, grad_t, lora_A, dropout_p, seed);
  const c10::cuda::CUDAGuard device_guard(grad_y.device());
  const auto dtype = grad_y.scalar_type();
  const int64_t M = grad_y.size(0);
  const int64_t K = weight.size(1);
  const int64_t r = grad_t.size(1);
  const at::Tensor A = lora_A.to(dtype).contiguous();
  // The split path: the LoRA term is written into dX's storage first, then cuBLAS accumulates dY·W into it
  // (beta = 1), so dX is written once by the LoRA term and read once inside cuBLAS' epilogue.
  if (dropout_p == 0.0 || M == 0 || K == 0) {
    at::Tensor grad_x = at::mm(grad_t, A);  // no mask: one more cuBLAS GEMM
    grad_x.addmm_(grad_y, weight);
    return grad_x;
  }
  at::Tensor grad_x = at::empty({M, K}, grad_y.options());
  const at::Tensor g = grad_t.contiguous();
  const int64_t m_tiles = ceil_div(M, kGradXBM);
  const int64_t k_tiles = ceil_div(K, kGradXBK);
  TORCH_CHECK(m_tiles <= std::numeric_limits<int32_t>::max() && k_tiles <= 65535,
              "lora_grad_x: too large for one launch, got weight ", describe(weight));
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(k_tiles));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  LORA_DISPATCH_FLOATING_TYPES(dtype, "lora_grad_x_cuda", [&] {
    lora_grad_x_dropout_kernel<scalar_t, kGradXBM, kGradXBK, kGradXRC, kGradXTX><<<grid, kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), A.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), M, K, r,
        static_cast<float>(1.0 / (1.0 - dropout_p)),
        make_dropout_params(dropout_p, seed_pointer(dropout_p, seed)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  grad_x.addmm_(grad_y, weight);
  return grad_x;
}

}  // namespace cuda
}  // namespace lora_kernels
