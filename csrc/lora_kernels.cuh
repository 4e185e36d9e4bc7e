// The CUDA kernels of the extension and their launch plans, free of ATen and of any CUDA runtime call.
//
// lora_fwd.cu / lora_bwd.cu include this file and launch the kernels. emulate/emulate_kernels.cpp
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
  constexpr int TY = kThreads / TX;
  constexpr int TM = BM / TY;
  constexpr int TR = RP / TX;
  static_assert(TY * TM == BM && TX * TR == RP, "tile does not match the thread grid");
  // Transposed tiles; the +1 keeps the transposing stores of a warp on distinct banks.
  __shared__ float x_tile[BK][BM + 1];
  __shared__ float a_tile[BK][RP + 1];

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % TX;
  const int ty = tid / TX;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * k_per_split;
  const int64_t k_end = k_begin + k_per_split < K ? k_begin + k_per_split : K;

  float acc[TM][TR];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int jj = 0; jj < TR; ++jj) {
      acc[i][jj] = 0.0f;
    }
  }

  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
    // Consecutive threads walk k: coalesced for a row-major x.
    for (int e = tid; e < BM * BK; e += kThreads) {
      const int kk = e % BK;
      const int mm = e / BK;
      const int64_t m = m0 + mm;
      const int64_t k = k0 + kk;
      float v = 0.0f;
      if (m < M && k < k_end) {
        v = static_cast<float>(x[m * x_stride_m + k * x_stride_k]);
        if (!dropout_keep(dropout, m, k)) {
          v = 0.0f;
        }
      }
      x_tile[kk][mm] = v;
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
      float a[TM];
      float b[TR];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        a[i] = x_tile[kk][ty + i * TY];
      }
#pragma unroll
      for (int jj = 0; jj < TR; ++jj) {
        b[jj] = a_tile[kk][tx + jj * TX];
      }
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int jj = 0; jj < TR; ++jj) {
          acc[i][jj] = fmaf(a[i], b[jj], acc[i][jj]);
        }
      }
    }
    __syncthreads();
  }

  float* out = partial + static_cast<int64_t>(blockIdx.y) * M * r;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = m0 + ty + i * TY;
    if (m >= M) {
      continue;
    }
#pragma unroll
    for (int jj = 0; jj < TR; ++jj) {
      const int j = tx + jj * TX;
      if (j < r) {
        out[m * r + j] = acc[i][jj] * scale;
      }
    }
  }
}

// Tile shapes per padded rank: (rows per block, K per tile, threads across r). Untuned (no GPU was at hand
// when they were written); each keeps shared memory under the 48 KiB static limit.
template <int RP>
struct ProjectTile;
template <>
struct ProjectTile<16> {
  static constexpr int BM = 128, BK = 32, TX = 4;
};
template <>
struct ProjectTile<64> {
  static constexpr int BM = 64, BK = 32, TX = 16;
};
template <>
struct ProjectTile<256> {
  static constexpr int BM = 32, BK = 32, TX = 32;
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
    float acc[TM][TR];
#pragma unroll
    for (int i = 0; i < TM; ++i) {
#pragma unroll
      for (int jj = 0; jj < TR; ++jj) {
        acc[i][jj] = 0.0f;
      }
    }

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
        float a[TM];
        float b[TR];
#pragma unroll
        for (int i = 0; i < TM; ++i) {
          a[i] = dy_tile[nn][ty + i * TY];
        }
#pragma unroll
        for (int jj = 0; jj < TR; ++jj) {
          b[jj] = b_tile[nn][tx + jj * TX];
        }
#pragma unroll
        for (int i = 0; i < TM; ++i) {
#pragma unroll
          for (int jj = 0; jj < TR; ++jj) {
            acc[i][jj] = fmaf(a[i], b[jj], acc[i][jj]);
          }
        }
      }

      // dB rows n0..n0+BN of this group += dY chunkᵀ · t tile
      float part[TN][TR];
#pragma unroll
      for (int i = 0; i < TN; ++i) {
#pragma unroll
        for (int jj = 0; jj < TR; ++jj) {
          part[i][jj] = 0.0f;
        }
      }
#pragma unroll 4
      for (int mm = 0; mm < BM; ++mm) {
        float d[TN];
        float tv[TR];
#pragma unroll
        for (int i = 0; i < TN; ++i) {
          d[i] = dy_tile[ty + i * TY][mm];
        }
#pragma unroll
        for (int jj = 0; jj < TR; ++jj) {
          tv[jj] = t_tile[mm][tx + jj * TX];
        }
#pragma unroll
        for (int i = 0; i < TN; ++i) {
#pragma unroll
          for (int jj = 0; jj < TR; ++jj) {
            part[i][jj] = fmaf(d[i], tv[jj], part[i][jj]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < TN; ++i) {
        const int64_t n = n0 + ty + i * TY;
        if (n >= n_end) {
          continue;
        }
#pragma unroll
        for (int jj = 0; jj < TR; ++jj) {
          const int j = tx + jj * TX;
          if (j < r) {
            grad_B[n * r + j] += part[i][jj];
          }
        }
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
      for (int jj = 0; jj < TR; ++jj) {
        const int j = tx + jj * TX;
        if (j < r) {
          grad_t[m * r + j] = acc[i][jj];
        }
      }
    }
  }
}

// (rows per tile, N per chunk, threads across r) per padded rank; untuned, each under 48 KiB of shared memory.
template <int RP>
struct GradTBTile;
template <>
struct GradTBTile<16> {
  static constexpr int BM = 128, BN = 64, TX = 4;
};
template <>
struct GradTBTile<64> {
  static constexpr int BM = 64, BN = 32, TX = 16;
};
template <>
struct GradTBTile<256> {
  static constexpr int BM = 16, BN = 16, TX = 32;
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
  constexpr int TX = kThreads / TY;
  constexpr int TR = RP / TY;
  constexpr int TK = BK / TX;
  static_assert(TY * TR == RP && TX * TK == BK, "tile does not match the thread grid");
  __shared__ float g_tile[BMC][RP];
  __shared__ float x_tile[BMC][BK];

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % TX;
  const int ty = tid / TX;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * BK;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.y) * rows_per_group;
  const int64_t m_end = m_begin + rows_per_group < M ? m_begin + rows_per_group : M;

  float acc[TR][TK];
#pragma unroll
  for (int i = 0; i < TR; ++i) {
#pragma unroll
    for (int q = 0; q < TK; ++q) {
      acc[i][q] = 0.0f;
    }
  }

  for (int64_t mb = m_begin; mb < m_end; mb += BMC) {
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
      float v = 0.0f;
      if (m < m_end && k < K) {
        v = static_cast<float>(x[m * x_stride_m + k * x_stride_k]);
        if (!dropout_keep(dropout, m, k)) {
          v = 0.0f;
        }
      }
      x_tile[mm][kk] = v;
    }
    __syncthreads();
#pragma unroll 4
    for (int mm = 0; mm < BMC; ++mm) {
      float a[TR];
      float b[TK];
#pragma unroll
      for (int i = 0; i < TR; ++i) {
        a[i] = g_tile[mm][ty + i * TY];
      }
#pragma unroll
      for (int q = 0; q < TK; ++q) {
        b[q] = x_tile[mm][tx + q * TX];
      }
#pragma unroll
      for (int i = 0; i < TR; ++i) {
#pragma unroll
        for (int q = 0; q < TK; ++q) {
          acc[i][q] = fmaf(a[i], b[q], acc[i][q]);
        }
      }
    }
    __syncthreads();
  }

  float* out = partial + static_cast<int64_t>(blockIdx.y) * r * K;
#pragma unroll
  for (int i = 0; i < TR; ++i) {
    const int j = ty + i * TY;
    if (j >= r) {
      continue;
    }
#pragma unroll
    for (int q = 0; q < TK; ++q) {
      const int64_t k = k0 + tx + q * TX;
      if (k < K) {
        out[j * K + k] = acc[i][q] * scale;
      }
    }
  }
}

// (rows per chunk, K per block, threads across r) per padded rank; untuned, under 48 KiB of shared memory.
template <int RP>
struct GradATile;
template <>
struct GradATile<16> {
  static constexpr int BMC = 16, BK = 256, TY = 4;
};
template <>
struct GradATile<64> {
  static constexpr int BMC = 32, BK = 64, TY = 16;
};
template <>
struct GradATile<256> {
  static constexpr int BMC = 16, BK = 32, TY = 32;
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
// GEMM with beta = 1 into dX (one pass over dX). With dropout the mask has to be applied to grad_t·A
// elementwise, which cuBLAS cannot do: this kernel computes a (BM, BK) tile of grad_t·A in registers
// (reducing r in RC-wide chunks through shared memory) and adds mask ⊙ tile into dX in place, reading and
// writing dX once and never materialising the mask or the (M, K) LoRA term.
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t, int BM, int BK, int RC, int TX>
__global__ void __launch_bounds__(kThreads)
    lora_grad_x_dropout_kernel(const scalar_t* __restrict__ grad_t, const scalar_t* __restrict__ lora_A,
                               scalar_t* __restrict__ grad_x, int64_t M, int64_t K, int64_t r, float scale,
                               DropoutParams dropout) {
  constexpr int TY = kThreads / TX;
  constexpr int TM = BM / TY;
  constexpr int TK = BK / TX;
  static_assert(TY * TM == BM && TX * TK == BK, "tile does not match the thread grid");
  __shared__ float g_tile[RC][BM + 1];  // transposed
  __shared__ float a_tile[RC][BK];

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % TX;
  const int ty = tid / TX;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * BK;

  float acc[TM][TK];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int q = 0; q < TK; ++q) {
      acc[i][q] = 0.0f;
    }
  }

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
      float a[TM];
      float b[TK];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        a[i] = g_tile[c][ty + i * TY];
      }
#pragma unroll
      for (int q = 0; q < TK; ++q) {
        b[q] = a_tile[c][tx + q * TX];
      }
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int q = 0; q < TK; ++q) {
          acc[i][q] = fmaf(a[i], b[q], acc[i][q]);
        }
      }
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
      if (k < K && dropout_keep(dropout, m, k)) {
        scalar_t* out = grad_x + m * K + k;
        *out = static_cast<scalar_t>(static_cast<float>(*out) + acc[i][q] * scale);
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
