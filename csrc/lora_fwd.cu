// CUDA forward: the skinny projection t = s·dropout(x)·Aᵀ (lora_project_kernel, in lora_kernels.cuh, where
// the reasons for each kernel are given), the output y = x·Wᵀ + b + s·(t·Bᵀ) (cuBLAS through ATen), and the
// dropout mask itself (for tests). The kernels are registered in lora_ops.cpp.

#include "lora_cuda_common.cuh"

namespace lora_kernels {
namespace cuda {

at::Tensor lora_project_cuda(const at::Tensor& x, const at::Tensor& lora_A, double scaling, double dropout_p,
                             const std::optional<at::Tensor>& seed) {
  check_project_args(x, lora_A, dropout_p, seed);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t M = x.size(0);
  const int64_t K = x.size(1);
  const int64_t r = lora_A.size(0);
  at::Tensor t = at::empty({M, r}, x.options().dtype(at::kFloat));
  if (M == 0) {
    return t;
  }
  if (K == 0) {
    return t.zero_();
  }
  // A is r x K: casting it to x.dtype is cheap, and makes the kernel's operands those of an x.dtype GEMM.
  const at::Tensor A = lora_A.to(x.scalar_type()).contiguous();
  const DropoutParams dropout = make_dropout_params(dropout_p, seed_pointer(dropout_p, seed));
  const float scale = static_cast<float>(dropout_p > 0.0 ? scaling / (1.0 - dropout_p) : scaling);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  LORA_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lora_project_cuda", [&] {
    dispatch_rank_tile(r, [&](auto rank_tile) {
      constexpr int RP = decltype(rank_tile)::value;
      using Tile = ProjectTile<RP>;
      const ProjectPlan plan = plan_project<RP>(M, K, target_blocks());
      TORCH_CHECK(plan.m_tiles <= std::numeric_limits<int32_t>::max(), "lora_project: too many rows, got x ",
                  describe(x));
      // One split writes t directly; more write (splits, M, r) partials reduced in order below.
      at::Tensor partial = plan.splits == 1 ? t : at::empty({plan.splits, M, r}, t.options());
      const dim3 grid(static_cast<unsigned>(plan.m_tiles), static_cast<unsigned>(plan.splits));
      lora_project_kernel<scalar_t, Tile::BM, Tile::BK, RP, Tile::TX><<<grid, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), A.const_data_ptr<scalar_t>(),
          partial.mutable_data_ptr<float>(), M, K, r, plan.k_per_split, scale, dropout);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (plan.splits > 1) {
        sum_partials(partial, t, 1.0f);
      }
    });
  });
  return t;
}

// ---------------------------------------------------------------------------------------------------------
// y = x·Wᵀ + b + s·(t·Bᵀ). Why cuBLAS (through at::addmm): the base GEMM is the large one and is best left to
// cuBLAS' tensor-core kernels; the LoRA term is a second GEMM with beta = 1 that accumulates into y in place,
// so there is no extra (M, N) tensor, only y read once more inside cuBLAS' epilogue.
// ---------------------------------------------------------------------------------------------------------
at::Tensor lora_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& t,
                                const at::Tensor& lora_B, double scaling) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  return lora_linear_fwd_aten(x, weight, bias, t, lora_B, scaling);
}

// ---------------------------------------------------------------------------------------------------------
// The (M, K) float32 dropout mask (1 / (1 - p) kept, 0 dropped): lets the tests compare the device Philox
// with lora_kernels.dropout.dropout_mask bit for bit. The ops themselves never materialise it.
// ---------------------------------------------------------------------------------------------------------
namespace {

// One thread per group of 8 columns of a row (`groups` per row): one Philox call, up to 8 stores.
__global__ void __launch_bounds__(kThreads)
    dropout_mask_kernel(float* __restrict__ out, int64_t rows, int64_t cols, int64_t groups, float scale,
                        DropoutParams dropout) {
  resolve_seed(dropout);
  const int64_t n = rows * groups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t row = i / groups;
    const int64_t col0 = (i % groups) * kDropoutElementsPerCall;
    const uint32_t bits = dropout_keep_bits(dropout, row, col0 / kDropoutElementsPerCall);
    for (int j = 0; j < kDropoutElementsPerCall && col0 + j < cols; ++j) {
      out[row * cols + col0 + j] = ((bits >> j) & 1u) ? scale : 0.0f;
    }
  }
}

}  // namespace

at::Tensor lora_dropout_mask_cuda(at::IntArrayRef size, double dropout_p, const at::Tensor& seed) {
  check_dropout_mask_args(size, dropout_p, seed);
  const at::Device where = seed.device();
  const c10::cuda::CUDAGuard device_guard(where);
  at::Tensor mask = at::empty(size, at::TensorOptions().dtype(at::kFloat).device(where));
  const int64_t n = mask.numel();
  if (n == 0) {
    return mask;
  }
  const int64_t cols = size.back();  // rows: the leading dims, flattened
  const int64_t groups = ceil_div(cols, kDropoutElementsPerCall);  // per row, one thread each
  const int64_t blocks = std::min(ceil_div(n / cols * groups, kThreads), 8 * target_blocks());
  dropout_mask_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      mask.mutable_data_ptr<float>(), n / cols, cols, groups, static_cast<float>(1.0 / (1.0 - dropout_p)),
      make_dropout_params(dropout_p, seed_pointer(dropout_p, seed)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

}  // namespace cuda
}  // namespace lora_kernels
