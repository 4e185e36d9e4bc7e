// The CUDA kernels of the extension and their launch plans, free of ATen and of any CUDA runtime call.
//
// lora_fwd.cu / lora_bwd.cu include this file and launch the kernels. tests/cuda_emulator/emulate_kernels.cpp
// includes the same file as plain C++, with threadIdx / __syncthreads and the like emulated by CPU threads,
// so tests/test_cuda_ext.py runs these exact kernels on machines without a GPU.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "philox.h"

namespace lora_kernels {
namespace cuda {

// Every tiled kernel runs 256 threads as a TY x TX grid: TX threads across the rank (or K) columns of a
// tile, TY across its rows; each thread owns a small register tile of outputs, strided by TX / TY so that
// the shared-memory reads of a warp are either consecutive or broadcast.
constexpr int kThreads = 256;

// Split-K / split-M partial sums are written to a float32 workspace and reduced in a fixed order (no float
// atomics, so results are deterministic run to run). Splits are limited so the workspace stays below this.
constexpr int64_t kWorkspaceBudgetBytes = int64_t{64} << 20;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The rank r is padded to a tile of 16, 64 or 256 columns, so a block holds all of r and reads its rows
// of x (or dY) once. Three sizes bound the padding waste to 4x while keeping the number of template
// instantiations (and the build time) small.
template <typename F>
void dispatch_rank_tile(int64_t r, F&& f) {
  if (r <= 16) {
    f(std::integral_constant<int, 16>{});
  } else if (r <= 64) {
    f(std::integral_constant<int, 64>{});
  } else {
    f(std::integral_constant<int, 256>{});
  }
}

// The value of a tile parameter for the padded rank `rp` (see dispatch_rank_tile), given its value for each.
constexpr int by_rank_tile(int rp, int for_16, int for_64, int for_256) {
  return rp == 16 ? for_16 : rp == 64 ? for_64 : for_256;
}

// out[i] = scale * sum_p partial[p][i] for i < len, summing p in order (deterministic).
template <typename out_t>
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const float* __restrict__ partial, out_t* __restrict__ out, int64_t parts, int64_t len,
                        float scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < len; i += stride) {
    float sum = 0.0f;
    for (int64_t p = 0; p < parts; ++p) {
      sum += partial[p * len + i];
    }
    out[i] = static_cast<out_t>(sum * scale);
  }
}

// The inner step of every tiled product below, one rank-1 update of a thread's register tile:
// acc[i][j] += a[(ty + i·TY)·A_STEP] · b[(tx + j·TX)·B_STEP], with a and b pointing into shared memory. A
// thread's rows are strided by TY and its columns by TX, so a warp reads consecutive words or a broadcast.
template <int TI, int TJ, int TY, int TX, int A_STEP = 1, int B_STEP = 1>
__device__ __forceinline__ void fma_tile(float (&acc)[TI][TJ], const float* a, const float* b, int ty, int tx) {
  float av[TI];
  float bv[TJ];
#pragma unroll
  for (int i = 0; i < TI; ++i) {
    av[i] = a[(ty + i * TY) * A_STEP];
  }
#pragma unroll
  for (int j = 0; j < TJ; ++j) {
    bv[j] = b[(tx + j * TX) * B_STEP];
  }
#pragma unroll
  for (int i = 0; i < TI; ++i) {
#pragma unroll
    for (int j = 0; j < TJ; ++j) {
      acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }
}

// A thread's register tile out to a row-major float32 matrix with leading dimension ld: element (i, j) goes
// to row row0 + ty + i·TY (if < rows), column col0 + tx + j·TX (if < cols), scaled; stored, or added with
// ACCUMULATE (into a slice no other block touches).
template <bool ACCUMULATE, int TI, int TJ, int TY, int TX>
__device__ __forceinline__ void store_tile(const float (&acc)[TI][TJ], float* __restrict__ out, int64_t ld,
                                           int64_t row0, int64_t rows, int64_t col0, int64_t cols, int ty, int tx,
                                           float scale) {
#pragma unroll
  for (int i = 0; i < TI; ++i) {
    const int64_t row = row0 + ty + i * TY;
    if (row >= rows) {
      continue;
    }
#pragma unroll
    for (int j = 0; j < TJ; ++j) {
      const int64_t col = col0 + tx + j * TX;
      if (col < cols) {
        float* dst = out + row * ld + col;
        *dst = ACCUMULATE ? *dst + acc[i][j] * scale : acc[i][j] * scale;
      }
    }
  }
}

// x[m, k] as float32, or 0 where `load` is false (outside the matrix, or dropped). x may have any strides.
template <typename scalar_t>
__device__ __forceinline__ float load_or_zero(const scalar_t* __restrict__ x, int64_t stride_m, int64_t stride_k,
                                              int64_t m, int64_t k, bool load) {
  return load ? static_cast<float>(x[m * stride_m + k * stride_k]) : 0.0f;
}

// The dropout mask of a (ROWS, COLS) tile whose first element is (m0, k0), as bits in shared memory:
// bits[mm][g] bit j is element (m0 + mm, k0 + 8·g + j). One Philox call per byte (8 columns), the block's
// threads sharing the ROWS·COLS/8 calls; the mask itself is never written to global memory. k0 must be a
// multiple of 8 (every caller's tiles start at multiples of their width, itself a multiple of 8), so that
// a byte is exactly one Philox group of dropout.py. Rows past the matrix get bits nobody reads. The caller
// synchronises before reading the bits.
template <int ROWS, int COLS>
__device__ __forceinline__ void fill_keep_bits(uint8_t (&bits)[ROWS][COLS / kDropoutElementsPerCall], int64_t m0,
                                               int64_t k0, const DropoutParams& dropout, int tid) {
  static_assert(COLS % kDropoutElementsPerCall == 0, "a keep tile holds whole groups of 8 columns");
  constexpr int kGroups = COLS / kDropoutElementsPerCall;
  for (int e = tid; e < ROWS * kGroups; e += kThreads) {
    const int g = e % kGroups;
    const int mm = e / kGroups;
    bits[mm][g] = static_cast<uint8_t>(dropout_keep_bits(dropout, m0 + mm, k0 / kDropoutElementsPerCall + g));
  }
}

// Column kk of a keep-tile row filled by fill_keep_bits.
__device__ __forceinline__ bool keep_bit(const uint8_t* row_bits, int kk) {
  return (row_bits[kk / kDropoutElementsPerCall] >> (kk % kDropoutElementsPerCall)) & 1u;
}

// ---------------------------------------------------------------------------------------------------------
// t = s·dropout(x)·Aᵀ: (M, K) x (K, r) -> (M, r) float32.
//
// Why a kernel and not cuBLAS: r is tiny (1..256), so this is a bandwidth-bound pass over x. Fusing the
// Philox mask into the load means x is read exactly once and no masked copy of x exists; the output stays
// float32 (cuBLAS would round t to x.dtype). A block holds BM rows of x and the whole padded rank RP, and
// walks its share of K in BK-wide tiles: x is loaded (masked, converted to fp32) into shared memory
// transposed, A's matching (RP, BK) tile beside it, and each thread accumulates a TM x TR register tile.
// When M alone gives too few blocks, K is split across blockIdx.y (deterministic split-K: each split
// writes its own float32 partial, reduced in order afterwards). Each element of A is rounded to x.dtype
// on the host (A is r x K, small) so the products are those of a GEMM in x.dtype; accumulation is fp32.
// x may have any strides (logical (m, k) indexing, also for the dropout counter).
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t, int BM, int BK, int RP, int TX>
__global__ void __launch_bounds__(kThreads)
    lora_project_kernel(const scalar_t* __restrict__ x, int64_t x_stride_m, int64_t x_stride_k,
                        const scalar_t* __restrict__ lora_A, float* __restrict__ partial, int64_t M, int64_t K,
                        int64_t r, int64_t k_per_split, float scale, DropoutParams dropout) {
  resolve_seed(dropout);  // one read of the seed tensor per thread
  constexpr int TY = kThreads / TX;
  constexpr int TM = BM / TY;
  constexpr int TR = RP / TX;
  static_assert(TY * TM == BM && TX * TR == RP, "tile does not match the thread grid");
  // Transposed tiles; the +1 keeps the transposing stores of a warp on distinct banks.
  __shared__ float x_tile[BK][BM + 1];
  __shared__ float a_tile[BK][RP + 1];
  __shared__ uint8_t keep_tile[BM][BK / kDropoutElementsPerCall];

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % TX;
  const int ty = tid / TX;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * k_per_split;
  const int64_t k_end = k_begin + k_per_split < K ? k_begin + k_per_split : K;

  float acc[TM][TR] = {};

  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {  // k0: a multiple of BK (k_per_split is one)
    if (dropout.enabled) {  // uniform across the block, and so is the barrier
      fill_keep_bits<BM, BK>(keep_tile, m0, k0, dropout, tid);
      __syncthreads();
    }
    // Consecutive threads walk k: coalesced for a row-major x.
    for (int e = tid; e < BM * BK; e += kThreads) {
      const int kk = e % BK;
      const int mm = e / BK;
      const int64_t m = m0 + mm;
      const int64_t k = k0 + kk;
      const bool keep = !dropout.enabled || keep_bit(keep_tile[mm], kk);
      x_tile[kk][mm] = load_or_zero(x, x_stride_m, x_stride_k, m, k, m < M && k < k_end && keep);
    }
    for (int e = tid; e < RP * BK; e += kThreads) {
      const int kk = e % BK;
      const int j = e / BK;
      const int64_t k = k0 + kk;
      a_tile[kk][j] = (j < r && k < k_end) ? static_cast<float>(lora_A[j * K + k]) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < BK; ++kk) {
      fma_tile<TM, TR, TY, TX>(acc, x_tile[kk], a_tile[kk], ty, tx);
    }
    __syncthreads();
  }

  float* out = partial + static_cast<int64_t>(blockIdx.y) * M * r;
  store_tile<false, TM, TR, TY, TX>(acc, out, r, m0, M, 0, r, ty, tx, scale);
}

// Tile shapes per padded rank: (rows per block, K per tile, threads across r). Untuned (not yet measured on
// a GPU); each keeps shared memory under the 48 KiB static limit.
template <int RP>
struct ProjectTile {
  static constexpr int BM = by_rank_tile(RP, 128, 64, 32), BK = 32, TX = by_rank_tile(RP, 4, 16, 32);
};

// Grid of lora_project_kernel: (m_tiles, splits), each split covering k_per_split columns of K.
struct ProjectPlan {
  int64_t m_tiles;
  int64_t splits;
  int64_t k_per_split;
};

// `target` is the number of blocks that fills the GPU (about 2 per SM). K is split only as far as needed
// to reach it; every split is non-empty.
template <int RP>
inline ProjectPlan plan_project(int64_t M, int64_t K, int64_t target) {
  using Tile = ProjectTile<RP>;
  ProjectPlan plan;
  plan.m_tiles = ceil_div(M, Tile::BM);
  const int64_t k_tiles = ceil_div(K, Tile::BK);
  const int64_t splits = std::clamp<int64_t>(ceil_div(target, plan.m_tiles), 1, k_tiles);
  plan.k_per_split = ceil_div(k_tiles, splits) * Tile::BK;
  plan.splits = ceil_div(K, plan.k_per_split);
  return plan;
}

// ---------------------------------------------------------------------------------------------------------
// grad_t = s·(dY·B) (M, r) and dB = dYᵀ·t (N, r), both from one read of dY.
//
// Why one kernel: for LoRA ranks both products are skinny and bandwidth-bound on dY (M x N); two cuBLAS
// calls would read dY twice. Each dY tile is loaded once into shared memory and used for both products.
//
// Work split: blockIdx.x is a group of consecutive BM-row tiles, blockIdx.y a range of N. For each of its
// row tiles a block keeps the tile's t rows in shared memory and its (BM, RP) grad_t accumulator in
// registers while it walks its N range in BN-wide chunks; per chunk it adds dY_chunkᵀ·t_tile into the rows
// n0..n0+BN of its group's dB partial (a float32 workspace slice no other block touches, so the
// read-modify-write is race-free and the order of additions is fixed). grad_t partials are per N range.
// Both partial sets are then reduced in order: deterministic, no float atomics. B arrives cast to dY's
// dtype and t is rounded to it as it is loaded (the GEMMs run in the compute dtype); accumulation is fp32.
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t, int BM, int BN, int RP, int TX>
__global__ void __launch_bounds__(kThreads)
    lora_grad_t_and_B_kernel(const scalar_t* __restrict__ grad_y, int64_t gy_stride_m, int64_t gy_stride_n,
                             const scalar_t* __restrict__ lora_B, const float* __restrict__ t,
                             float* __restrict__ grad_t_partial, float* __restrict__ grad_B_partial, int64_t M,
                             int64_t N, int64_t r, int64_t tiles_per_group, int64_t n_per_split) {
  constexpr int TY = kThreads / TX;
  constexpr int TM = BM / TY;
  constexpr int TN = BN / TY;
  constexpr int TR = RP / TX;
  static_assert(TY * TM == BM && TY * TN == BN && TX * TR == RP, "tile does not match the thread grid");
  __shared__ float t_tile[BM][RP];
  __shared__ float b_tile[BN][RP];
  __shared__ float dy_tile[BN][BM + 1];  // transposed; +1 keeps the transposing stores on distinct banks

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % TX;
  const int ty = tid / TX;
  const int64_t m_tiles = (M + BM - 1) / BM;
  const int64_t tile_begin = static_cast<int64_t>(blockIdx.x) * tiles_per_group;
  const int64_t tile_end = tile_begin + tiles_per_group < m_tiles ? tile_begin + tiles_per_group : m_tiles;
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * n_per_split;
  const int64_t n_end = n_begin + n_per_split < N ? n_begin + n_per_split : N;
  float* grad_B = grad_B_partial + static_cast<int64_t>(blockIdx.x) * N * r;
  float* grad_t = grad_t_partial + static_cast<int64_t>(blockIdx.y) * M * r;

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t m0 = tile * BM;
    // Safe to overwrite: the previous tile's last N chunk ended with a barrier (every range is non-empty).
    for (int e = tid; e < BM * RP; e += kThreads) {
      const int j = e % RP;
      const int mm = e / RP;
      const int64_t m = m0 + mm;
      t_tile[mm][j] = (m < M && j < r) ? static_cast<float>(static_cast<scalar_t>(t[m * r + j])) : 0.0f;
    }
    float acc[TM][TR] = {};

    for (int64_t n0 = n_begin; n0 < n_end; n0 += BN) {
      for (int e = tid; e < BM * BN; e += kThreads) {
        const int nn = e % BN;
        const int mm = e / BN;
        const int64_t m = m0 + mm;
        const int64_t n = n0 + nn;
        dy_tile[nn][mm] =
            (m < M && n < n_end) ? static_cast<float>(grad_y[m * gy_stride_m + n * gy_stride_n]) : 0.0f;
      }
      for (int e = tid; e < BN * RP; e += kThreads) {
        const int j = e % RP;
        const int nn = e / RP;
        const int64_t n = n0 + nn;
        b_tile[nn][j] = (n < n_end && j < r) ? static_cast<float>(lora_B[n * r + j]) : 0.0f;
      }
      __syncthreads();

      // grad_t tile += dY chunk · B chunk
#pragma unroll 4
      for (int nn = 0; nn < BN; ++nn) {
        fma_tile<TM, TR, TY, TX>(acc, dy_tile[nn], b_tile[nn], ty, tx);
      }

      // dB rows n0..n0+BN of this group += dY chunkᵀ · t tile
      float part[TN][TR] = {};
#pragma unroll 4
      for (int mm = 0; mm < BM; ++mm) {  // dY read down a column of the transposed tile
        fma_tile<TN, TR, TY, TX, BM + 1>(part, &dy_tile[0][mm], t_tile[mm], ty, tx);
      }
      store_tile<true, TN, TR, TY, TX>(part, grad_B, r, n0, n_end, 0, r, ty, tx, 1.0f);
      __syncthreads();
    }

    store_tile<false, TM, TR, TY, TX>(acc, grad_t, r, m0, M, 0, r, ty, tx, 1.0f);
  }
}

// (rows per tile, N per chunk, threads across r) per padded rank; untuned, each under 48 KiB of shared memory.
template <int RP>
struct GradTBTile {
  static constexpr int BM = by_rank_tile(RP, 128, 64, 16), BN = by_rank_tile(RP, 64, 32, 16),
                       TX = by_rank_tile(RP, 4, 16, 32);
};

// Grid of lora_grad_t_and_B_kernel: (groups, n_splits). Row groups come first (each adds a (N, r) dB
// partial), then N splits if the groups alone leave the GPU idle (each adds a (M, r) grad_t partial); both
// are bounded by the workspace budget, and no group or split is empty.
struct GradTBPlan {
  int64_t groups;
  int64_t tiles_per_group;
  int64_t n_splits;
  int64_t n_per_split;
};

template <int RP>
inline GradTBPlan plan_grad_t_and_B(int64_t M, int64_t N, int64_t r, int64_t target) {
  using Tile = GradTBTile<RP>;
  GradTBPlan plan;
  const int64_t m_tiles = ceil_div(M, Tile::BM);
  const int64_t n_chunks = ceil_div(N, Tile::BN);
  const int64_t groups =
      std::min({m_tiles, target, std::max<int64_t>(1, kWorkspaceBudgetBytes / (N * r * 4))});
  plan.tiles_per_group = ceil_div(m_tiles, groups);
  plan.groups = ceil_div(m_tiles, plan.tiles_per_group);
  int64_t n_splits = std::clamp<int64_t>(ceil_div(target, plan.groups), 1, n_chunks);
  n_splits = std::min(n_splits, std::max<int64_t>(1, kWorkspaceBudgetBytes / (M * r * 4)));
  plan.n_per_split = ceil_div(n_chunks, n_splits) * Tile::BN;
  plan.n_splits = ceil_div(N, plan.n_per_split);
  return plan;
}

// ---------------------------------------------------------------------------------------------------------
// dA = grad_tᵀ·dropout(x): (r, M) x (M, K) -> (r, K) float32.
//
// Why a kernel (dropout on): the mask has to be applied to x, and fusing it into the load avoids writing a
// masked copy of x. Without dropout there is nothing to fuse and the op calls cuBLAS (tensor cores) instead.
// A block owns BK columns of dA and all of the padded rank; it walks its group of rows in BMC-row chunks.
// blockIdx.y splits M (deterministic split-M: per-group float32 partials, reduced in order).
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t, int BMC, int BK, int RP, int TY>
__global__ void __launch_bounds__(kThreads)
    lora_grad_A_kernel(const scalar_t* __restrict__ grad_t, const scalar_t* __restrict__ x, int64_t x_stride_m,
                       int64_t x_stride_k, float* __restrict__ partial, int64_t M, int64_t K, int64_t r,
                       int64_t rows_per_group, float scale, DropoutParams dropout) {
  resolve_seed(dropout);  // one read of the seed tensor per thread
  constexpr int TX = kThreads / TY;
  constexpr int TR = RP / TY;
  constexpr int TK = BK / TX;
  static_assert(TY * TR == RP && TX * TK == BK, "tile does not match the thread grid");
  __shared__ float g_tile[BMC][RP];
  __shared__ float x_tile[BMC][BK];
  __shared__ uint8_t keep_tile[BMC][BK / kDropoutElementsPerCall];

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % TX;
  const int ty = tid / TX;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * BK;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.y) * rows_per_group;
  const int64_t m_end = m_begin + rows_per_group < M ? m_begin + rows_per_group : M;

  float acc[TR][TK] = {};

  for (int64_t mb = m_begin; mb < m_end; mb += BMC) {
    if (dropout.enabled) {  // k0 is a multiple of BK, itself a multiple of 8
      fill_keep_bits<BMC, BK>(keep_tile, mb, k0, dropout, tid);
      __syncthreads();
    }
    for (int e = tid; e < BMC * RP; e += kThreads) {
      const int j = e % RP;
      const int mm = e / RP;
      const int64_t m = mb + mm;
      g_tile[mm][j] = (m < m_end && j < r) ? static_cast<float>(grad_t[m * r + j]) : 0.0f;
    }
    for (int e = tid; e < BMC * BK; e += kThreads) {
      const int kk = e % BK;
      const int mm = e / BK;
      const int64_t m = mb + mm;
      const int64_t k = k0 + kk;
      const bool keep = !dropout.enabled || keep_bit(keep_tile[mm], kk);
      x_tile[mm][kk] = load_or_zero(x, x_stride_m, x_stride_k, m, k, m < m_end && k < K && keep);
    }
    __syncthreads();
#pragma unroll 4
    for (int mm = 0; mm < BMC; ++mm) {
      fma_tile<TR, TK, TY, TX>(acc, g_tile[mm], x_tile[mm], ty, tx);
    }
    __syncthreads();
  }

  float* out = partial + static_cast<int64_t>(blockIdx.y) * r * K;
  store_tile<false, TR, TK, TY, TX>(acc, out, K, 0, r, k0, K, ty, tx, scale);
}

// (rows per chunk, K per block, threads across r) per padded rank; untuned, under 48 KiB of shared memory.
template <int RP>
struct GradATile {
  static constexpr int BMC = by_rank_tile(RP, 16, 32, 16), BK = by_rank_tile(RP, 256, 64, 32),
                       TY = by_rank_tile(RP, 4, 16, 32);
};

// Grid of lora_grad_A_kernel: (k_tiles, groups), each group covering rows_per_group rows of M.
struct GradAPlan {
  int64_t k_tiles;
  int64_t groups;
  int64_t rows_per_group;
};

template <int RP>
inline GradAPlan plan_grad_A(int64_t M, int64_t K, int64_t r, int64_t target) {
  using Tile = GradATile<RP>;
  GradAPlan plan;
  plan.k_tiles = ceil_div(K, Tile::BK);
  const int64_t m_chunks = ceil_div(M, Tile::BMC);
  int64_t groups = std::clamp<int64_t>(ceil_div(target, plan.k_tiles), 1, m_chunks);
  groups = std::min(groups, std::max<int64_t>(1, kWorkspaceBudgetBytes / (r * K * 4)));
  plan.rows_per_group = ceil_div(m_chunks, groups) * Tile::BMC;
  plan.groups = ceil_div(M, plan.rows_per_group);
  return plan;
}

// ---------------------------------------------------------------------------------------------------------
// dX = dY·W + dropout'(grad_t·A), dropout' being the same mask times 1 / (1 - p).
//
// Why this split: dY·W is a full-size GEMM, left to cuBLAS. Without dropout the LoRA term is one more cuBLAS
// GEMM. With dropout the mask has to be applied to grad_t·A elementwise, which cuBLAS cannot do: this kernel
// computes a (BM, BK) tile of grad_t·A in registers (reducing r in RC-wide chunks through shared memory) and
// never materialises the mask. It writes mask ⊙ tile into a fresh dX (a product, so a NaN in a dropped
// element stays NaN, as x·mask does), and cuBLAS then accumulates dY·W into it with beta = 1 (the split
// path, lora_bwd.cu): one write of dX and one read inside cuBLAS' epilogue.
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t, int BM, int BK, int RC, int TX>
__global__ void __launch_bounds__(kThreads)
    lora_grad_x_dropout_kernel(const scalar_t* __restrict__ grad_t, const scalar_t* __restrict__ lora_A,
                               scalar_t* __restrict__ grad_x, int64_t M, int64_t K, int64_t r, float scale,
                               DropoutParams dropout) {
  resolve_seed(dropout);  // one read of the seed tensor per thread
  constexpr int TY = kThreads / TX;
  constexpr int TM = BM / TY;
  constexpr int TK = BK / TX;
  static_assert(TY * TM == BM && TX * TK == BK, "tile does not match the thread grid");
  __shared__ float g_tile[RC][BM + 1];  // transposed
  __shared__ float a_tile[RC][BK];
  __shared__ uint8_t keep_tile[BM][BK / kDropoutElementsPerCall];

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % TX;
  const int ty = tid / TX;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * BK;

  float acc[TM][TK] = {};
  // The tile's mask, read by the epilogue: the barriers of the loop below (r >= 1) publish it.
  fill_keep_bits<BM, BK>(keep_tile, m0, k0, dropout, tid);

  for (int64_t c0 = 0; c0 < r; c0 += RC) {
    for (int e = tid; e < BM * RC; e += kThreads) {
      const int c = e % RC;
      const int mm = e / RC;
      const int64_t m = m0 + mm;
      const int64_t j = c0 + c;
      g_tile[c][mm] = (m < M && j < r) ? static_cast<float>(grad_t[m * r + j]) : 0.0f;
    }
    for (int e = tid; e < RC * BK; e += kThreads) {
      const int kk = e % BK;
      const int c = e / BK;
      const int64_t j = c0 + c;
      const int64_t k = k0 + kk;
      a_tile[c][kk] = (j < r && k < K) ? static_cast<float>(lora_A[j * K + k]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < RC; ++c) {
      fma_tile<TM, TK, TY, TX>(acc, g_tile[c], a_tile[c], ty, tx);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = m0 + ty + i * TY;
    if (m >= M) {
      continue;
    }
#pragma unroll
    for (int q = 0; q < TK; ++q) {
      const int64_t k = k0 + tx + q * TX;
      if (k < K) {
        const float keep = keep_bit(keep_tile[ty + i * TY], tx + q * TX) ? scale : 0.0f;
        grad_x[m * K + k] = static_cast<scalar_t>(acc[i][q] * keep);
      }
    }
  }
}

constexpr int kGradXBM = 32;
constexpr int kGradXBK = 128;
constexpr int kGradXRC = 16;
constexpr int kGradXTX = 32;

}  // namespace cuda
}  // namespace lora_kernels
