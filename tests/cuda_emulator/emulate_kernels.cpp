// Runs the CUDA kernels of csrc/lora_kernels.cuh on the CPU, for machines without a GPU.
//
// The kernel source is compiled as plain C++. The 256 threads of a block are ucontext coroutines on one OS
// thread: each runs until it reaches __syncthreads() (or finishes), then the next one runs, so a "pass" over
// the threads is one barrier phase. __shared__ arrays are function-local statics (shared by a block's
// threads; blocks run one after another). A missing barrier shows up deterministically as a thread reading
// shared memory that another has already overwritten, and threads that disagree on the number of barriers
// are reported. This checks the kernels' indexing, bounds, tiling, barriers and launch plans (splits,
// groups) against float64 references on the same rounded inputs; it says nothing about warp-level
// behaviour, memory coalescing or speed.
//
// Built and run by tests/test_cuda_ext.py::test_cuda_kernels_emulated_on_cpu:
//   c++ -std=c++20 -O1 -I<torch>/include -I<repo>/csrc emulate_kernels.cpp -o emulate && ./emulate
// Prints one line per failing case and "all N cases passed" on success (exit code 0).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

// ---- the CUDA execution model, on coroutines -------------------------------------------------------------
struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};
Dim3 threadIdx;  // set by the scheduler before it resumes a thread
Dim3 blockIdx;
Dim3 gridDim;
Dim3 blockDim;

namespace emu {
ucontext_t scheduler;
std::vector<ucontext_t> contexts;
std::vector<std::vector<char>> stacks;
std::vector<bool> finished;
int current = 0;
std::function<void()> body;

void entry(int t) {
  body();
  finished[t] = true;  // returning resumes `scheduler` through uc_link
}
}  // namespace emu

inline void __syncthreads() {
  swapcontext(&emu::contexts[emu::current], &emu::scheduler);
}

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

#include "lora_kernels.cuh"  // from csrc/ (-I)

using namespace lora_kernels;
using namespace lora_kernels::cuda;

// Runs one block: every pass resumes each unfinished thread until its next barrier.
void run_block(unsigned threads) {
  constexpr size_t kStack = 256 * 1024;
  emu::contexts.resize(threads);
  emu::stacks.resize(threads);
  emu::finished.assign(threads, false);
  for (unsigned t = 0; t < threads; ++t) {
    emu::stacks[t].resize(kStack);
    getcontext(&emu::contexts[t]);
    emu::contexts[t].uc_stack.ss_sp = emu::stacks[t].data();
    emu::contexts[t].uc_stack.ss_size = kStack;
    emu::contexts[t].uc_link = &emu::scheduler;
    makecontext(&emu::contexts[t], reinterpret_cast<void (*)()>(emu::entry), 1, static_cast<int>(t));
  }
  for (;;) {
    unsigned done = 0;
    for (unsigned t = 0; t < threads; ++t) {
      if (emu::finished[t]) {
        ++done;
        continue;
      }
      emu::current = static_cast<int>(t);
      threadIdx = Dim3{t, 0, 0};
      swapcontext(&emu::scheduler, &emu::contexts[t]);
    }
    unsigned now_done = 0;
    for (unsigned t = 0; t < threads; ++t) {
      now_done += emu::finished[t] ? 1 : 0;
    }
    if (now_done == threads) {
      return;
    }
    if (now_done != 0 || done != 0) {
      std::printf("FATAL: threads of block (%u, %u) disagree on the number of __syncthreads()\n", blockIdx.x,
                  blockIdx.y);
      std::exit(2);
    }
  }
}

template <typename Kernel, typename... Args>
void launch(int64_t grid_x, int64_t grid_y, Kernel kernel, Args... args) {
  gridDim = Dim3{static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y), 1};
  blockDim = Dim3{static_cast<unsigned>(kThreads), 1, 1};
  emu::body = [&] { kernel(args...); };
  for (unsigned by = 0; by < gridDim.y; ++by) {
    for (unsigned bx = 0; bx < gridDim.x; ++bx) {
      blockIdx = Dim3{bx, by, 0};
      run_block(blockDim.x);
    }
  }
}

template <typename out_t>
void sum_partials(const std::vector<float>& partial, out_t* out, int64_t parts, int64_t len, float scale) {
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(len, kThreads), 3));
  launch(blocks, 1, sum_partials_kernel<out_t>, partial.data(), out, parts, len, scale);
}

// ---- the launchers of lora_fwd.cu / lora_bwd.cu, on std::vector ------------------------------------------
// `target` stands for target_blocks() (2 x SM count); small and large values exercise every launch plan.

template <typename T>
std::vector<float> project(const T* x, int64_t sm, int64_t sk, const std::vector<T>& A, int64_t M, int64_t K,
                           int64_t r, double scaling, double p, int64_t seed, int64_t target) {
  std::vector<float> t(M * r);
  const DropoutParams dropout = make_dropout_params(p, &seed);
  const float scale = static_cast<float>(p > 0.0 ? scaling / (1.0 - p) : scaling);
  dispatch_rank_tile(r, [&](auto rank_tile) {
    constexpr int RP = decltype(rank_tile)::value;
    using Tile = ProjectTile<RP>;
    const ProjectPlan plan = plan_project<RP>(M, K, target);
    std::vector<float> partial(plan.splits == 1 ? 0 : plan.splits * M * r);
    float* out = plan.splits == 1 ? t.data() : partial.data();
    launch(plan.m_tiles, plan.splits, lora_project_kernel<T, Tile::BM, Tile::BK, RP, Tile::TX>, x, sm, sk,
           A.data(), out, M, K, r, plan.k_per_split, scale, dropout);
    if (plan.splits > 1) {
      sum_partials(partial, t.data(), plan.splits, M * r, 1.0f);
    }
  });
  return t;
}

template <typename T>
void grad_t_and_B(const T* dy, int64_t sm, int64_t sn, const std::vector<T>& B, const std::vector<float>& t,
                  int64_t M, int64_t N, int64_t r, double scaling, int64_t target, std::vector<T>& grad_t,
                  std::vector<float>& grad_B) {
  grad_t.assign(M * r, T(0.0f));
  grad_B.assign(N * r, 0.0f);
  dispatch_rank_tile(r, [&](auto rank_tile) {
    constexpr int RP = decltype(rank_tile)::value;
    using Tile = GradTBTile<RP>;
    const GradTBPlan plan = plan_grad_t_and_B<RP>(M, N, r, target);
    std::vector<float> grad_t_partial(plan.n_splits * M * r, NAN);
    std::vector<float> grad_B_partial(plan.groups * N * r, 0.0f);
    launch(plan.groups, plan.n_splits, lora_grad_t_and_B_kernel<T, Tile::BM, Tile::BN, RP, Tile::TX>, dy, sm, sn,
           B.data(), t.data(), grad_t_partial.data(), grad_B_partial.data(), M, N, r, plan.tiles_per_group,
           plan.n_per_split);
    sum_partials(grad_t_partial, grad_t.data(), plan.n_splits, M * r, static_cast<float>(scaling));
    if (plan.groups == 1) {
      grad_B = grad_B_partial;
    } else {
      sum_partials(grad_B_partial, grad_B.data(), plan.groups, N * r, 1.0f);
    }
  });
}

template <typename T>
std::vector<float> grad_A(const std::vector<T>& grad_t, const T* x, int64_t sm, int64_t sk, int64_t M, int64_t K,
                          int64_t r, double p, int64_t seed, int64_t target) {
  std::vector<float> out(r * K, NAN);
  const DropoutParams dropout = make_dropout_params(p, &seed);
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  dispatch_rank_tile(r, [&](auto rank_tile) {
    constexpr int RP = decltype(rank_tile)::value;
    using Tile = GradATile<RP>;
    const GradAPlan plan = plan_grad_A<RP>(M, K, r, target);
    std::vector<float> partial(plan.groups == 1 ? 0 : plan.groups * r * K, NAN);
    float* dst = plan.groups == 1 ? out.data() : partial.data();
    launch(plan.k_tiles, plan.groups, lora_grad_A_kernel<T, Tile::BMC, Tile::BK, RP, Tile::TY>, grad_t.data(), x,
           sm, sk, dst, M, K, r, plan.rows_per_group, scale, dropout);
    if (plan.groups > 1) {
      sum_partials(partial, out.data(), plan.groups, r * K, 1.0f);
    }
  });
  return out;
}

template <typename T>
void grad_x_dropout(const std::vector<T>& grad_t, const std::vector<T>& A, std::vector<T>& grad_x, int64_t M,
                    int64_t K, int64_t r, double p, int64_t seed) {
  launch(ceil_div(M, kGradXBM), ceil_div(K, kGradXBK),
         lora_grad_x_dropout_kernel<T, kGradXBM, kGradXBK, kGradXRC, kGradXTX>, grad_t.data(), A.data(),
         grad_x.data(), M, K, r, static_cast<float>(1.0 / (1.0 - p)), make_dropout_params(p, &seed));
}

// ---- float64 references on the same rounded operands ------------------------------------------------------

int g_failures = 0;
int g_cases = 0;

template <typename T>
double eps();
template <>
double eps<float>() {
  return 1e-5;
}
template <>
double eps<c10::Half>() {
  return 2e-3;
}
template <>
double eps<c10::BFloat16>() {
  return 1.6e-2;
}

// max |got - want| <= tol * max(1, max |want|)
template <typename G>
void expect_close(const std::string& what, const G* got, const std::vector<double>& want, double tol) {
  double scale = 1.0;
  for (double w : want) {
    scale = std::max(scale, std::fabs(w));
  }
  double worst = 0.0;
  size_t worst_at = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(static_cast<double>(static_cast<float>(got[i])) - want[i]);
    if (!(err <= worst)) {  // also catches NaN
      worst = std::isnan(err) ? INFINITY : err;
      worst_at = i;
    }
  }
  if (worst > tol * scale) {
    ++g_failures;
    std::printf("FAIL %s: max error %.3g at flat index %zu (tolerance %.3g)\n", what.c_str(), worst, worst_at,
                tol * scale);
  }
}

template <typename T>
void run_case(const char* dtype, int64_t M, int64_t K, int64_t N, int64_t r, double p, int64_t target,
              int layout, uint32_t rng_seed) {
  ++g_cases;
  const double scaling = 1.5;
  const int64_t seed = (int64_t{1} << 40) + 12345;
  std::mt19937 gen(rng_seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto randn = [&](int64_t n, float std) {
    std::vector<T> v(n);
    for (auto& e : v) {
      e = static_cast<T>(normal(gen) * std);
    }
    return v;
  };
  auto d = [](T v) { return static_cast<double>(static_cast<float>(v)); };

  // x in one of three layouts: row-major, column-major (a transpose), every other column (a slice).
  int64_t xsm = K, xsk = 1;
  std::vector<T> x_store;
  if (layout == 0) {
    x_store = randn(M * K, 1.0f);
  } else if (layout == 1) {
    xsm = 1, xsk = M;
    x_store = randn(M * K, 1.0f);
  } else {
    xsm = 2 * K, xsk = 2;
    x_store = randn(2 * M * K + 1, 1.0f);
  }
  const T* x = x_store.data();
  auto X = [&](int64_t m, int64_t k) { return d(x[m * xsm + k * xsk]); };
  // dy: row-major, or a zero row stride (an expanded (1, N) gradient) for layout 2.
  std::vector<T> dy_store = randn(layout == 2 ? N : M * N, 1.0f);
  const int64_t dsm = layout == 2 ? 0 : N;
  auto DY = [&](int64_t m, int64_t n) { return d(dy_store[m * dsm + n]); };

  const std::vector<T> A = randn(r * K, 1.0f / std::sqrt(static_cast<float>(K)));
  const std::vector<T> B = randn(N * r, 1.0f / std::sqrt(static_cast<float>(r)));
  DropoutParams dropout = make_dropout_params(p, &seed);  // the seed behind a pointer, as on the device
  resolve_seed(dropout);
  const double keep_scale = 1.0 / (1.0 - p);
  auto mask = [&](int64_t m, int64_t k) { return dropout_keep(dropout, m, k) ? keep_scale : 0.0; };
  const std::string tag = std::string(dtype) + " M=" + std::to_string(M) + " K=" + std::to_string(K) +
                          " N=" + std::to_string(N) + " r=" + std::to_string(r) + " p=" + std::to_string(p) +
                          " target=" + std::to_string(target) + " layout=" + std::to_string(layout);

  // t = s·dropout(x)·Aᵀ
  const std::vector<float> t = project<T>(x, xsm, xsk, A, M, K, r, scaling, p, seed, target);
  std::vector<double> want(M * r);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < r; ++j) {
      double s = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        s += mask(m, k) * X(m, k) * d(A[j * K + k]);
      }
      want[m * r + j] = scaling * s;
    }
  }
  expect_close(tag + " t", t.data(), want, 1e-5);

  // grad_t = s·dY·B, dB = dYᵀ·t (t rounded to T)
  std::vector<T> grad_t;
  std::vector<float> grad_B;
  grad_t_and_B<T>(dy_store.data(), dsm, 1, B, t, M, N, r, scaling, target, grad_t, grad_B);
  want.assign(M * r, 0.0);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < r; ++j) {
      double s = 0.0;
      for (int64_t n = 0; n < N; ++n) {
        s += DY(m, n) * d(B[n * r + j]);
      }
      want[m * r + j] = scaling * s;
    }
  }
  expect_close(tag + " grad_t", grad_t.data(), want, eps<T>());
  want.assign(N * r, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < r; ++j) {
      double s = 0.0;
      for (int64_t m = 0; m < M; ++m) {
        s += DY(m, n) * d(static_cast<T>(t[m * r + j]));
      }
      want[n * r + j] = s;
    }
  }
  expect_close(tag + " grad_B", grad_B.data(), want, 1e-5);

  if (p == 0.0) {
    return;  // dA and the LoRA part of dX go to cuBLAS without dropout
  }
  // dA = grad_tᵀ·dropout(x)
  const std::vector<float> dA = grad_A<T>(grad_t, x, xsm, xsk, M, K, r, p, seed, target);
  want.assign(r * K, 0.0);
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t k = 0; k < K; ++k) {
      double s = 0.0;
      for (int64_t m = 0; m < M; ++m) {
        s += d(grad_t[m * r + j]) * mask(m, k) * X(m, k);
      }
      want[j * K + k] = s;
    }
  }
  expect_close(tag + " grad_A", dA.data(), want, 1e-5);

  // dX's LoRA term dropout'(grad_t·A), written over whatever dX held (cuBLAS adds dY·W to it afterwards)
  std::vector<T> grad_x = randn(M * K, 1.0f);
  want.assign(M * K, 0.0);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) {
      double s = 0.0;
      for (int64_t j = 0; j < r; ++j) {
        s += d(grad_t[m * r + j]) * d(A[j * K + k]);
      }
      want[m * K + k] = mask(m, k) * s;
    }
  }
  grad_x_dropout<T>(grad_t, A, grad_x, M, K, r, p, seed);
  expect_close(tag + " grad_x", grad_x.data(), want, eps<T>());
}

template <typename T>
void run_dtype(const char* dtype) {
  uint32_t rng_seed = 0;
  // r covers every rank tile and its edges (16 | 64 | 256); target 1 gives one block per row tile (no
  // splits), 264 that of a 132-SM GPU (K / N / M splits and row groups as far as the shape allows).
  for (int64_t r : {1, 5, 17, 64, 65, 256}) {
    for (double p : {0.0, 0.3}) {
      for (int64_t target : {1, 264}) {
        ++rng_seed;
        run_case<T>(dtype, 37, 70, 45, r, p, target, static_cast<int>(rng_seed % 3), rng_seed);
      }
    }
  }
  // Several row tiles, N chunks, K tiles and groups at once.
  run_case<T>(dtype, 300, 530, 200, 16, 0.25, 264, 0, ++rng_seed);
  run_case<T>(dtype, 161, 300, 170, 48, 0.25, 8, 2, ++rng_seed);
  run_case<T>(dtype, 70, 129, 50, 200, 0.25, 264, 1, ++rng_seed);
  run_case<T>(dtype, 1, 1000, 9, 8, 0.1, 264, 0, ++rng_seed);
}

// An inf in x (or dY) reaches its own row's (or column's) results only, as an inf, never NaN: the kernels
// pad the rank to 16 / 64 / 256 lanes, whose products with an inf are NaN, and never store those lanes.
// All operands are positive, so no result mixes +inf and -inf.
void run_inf_case(int64_t r, double p) {
  ++g_cases;
  const int64_t M = 9, K = 40, N = 12, seed = 777;
  const double scaling = 1.5;
  DropoutParams dropout = make_dropout_params(p, &seed);  // the seed behind a pointer, as on the device
  resolve_seed(dropout);
  std::mt19937 gen(static_cast<uint32_t>(r));
  std::uniform_real_distribution<float> uniform(0.1f, 1.0f);
  auto rand = [&](int64_t n) {
    std::vector<float> v(n);
    for (auto& e : v) {
      e = uniform(gen);
    }
    return v;
  };
  const std::vector<float> A = rand(r * K), B = rand(N * r);
  std::vector<float> x = rand(M * K), dy = rand(M * N);
  int64_t k_inf = 0;  // a kept element (a dropped inf is NaN in x·mask, as in PyTorch; not the point here)
  while (p > 0.0 && !dropout_keep(dropout, 3, k_inf)) {
    ++k_inf;
  }
  const std::vector<float> t_finite = project<float>(x.data(), K, 1, A, M, K, r, scaling, p, seed, 264);
  x[3 * K + k_inf] = -INFINITY;
  dy[5 * N + 2] = INFINITY;
  int bad = 0;
  auto check = [&](bool ok) { bad += ok ? 0 : 1; };

  const std::vector<float> t = project<float>(x.data(), K, 1, A, M, K, r, scaling, p, seed, 264);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < r; ++j) {
      check(m == 3 ? t[m * r + j] == -INFINITY : std::isfinite(t[m * r + j]));
    }
  }
  std::vector<float> grad_t, grad_B;
  grad_t_and_B<float>(dy.data(), N, 1, B, t_finite, M, N, r, scaling, 264, grad_t, grad_B);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < r; ++j) {
      check(m == 5 ? grad_t[m * r + j] == INFINITY : std::isfinite(grad_t[m * r + j]));
    }
  }
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < r; ++j) {
      check(n == 2 ? grad_B[n * r + j] == INFINITY : std::isfinite(grad_B[n * r + j]));
    }
  }
  if (p > 0.0) {  // dA = grad_tᵀ·dropout(x), with a finite grad_t
    std::vector<float> finite_grad_t;
    grad_t_and_B<float>(rand(M * N).data(), N, 1, B, t_finite, M, N, r, scaling, 264, finite_grad_t, grad_B);
    const std::vector<float> dA = grad_A<float>(finite_grad_t, x.data(), K, 1, M, K, r, p, seed, 264);
    for (int64_t j = 0; j < r; ++j) {
      for (int64_t k = 0; k < K; ++k) {
        check(k == k_inf ? dA[j * K + k] == -INFINITY : std::isfinite(dA[j * K + k]));
      }
    }
  }
  if (bad != 0) {
    ++g_failures;
    std::printf("FAIL inf in x / dY, r=%ld p=%.2f: %d results not the expected inf / finite\n",
                static_cast<long>(r), p, bad);
  }
}

int main() {
  for (int64_t r : {1, 4, 5, 17, 64, 65}) {
    for (double p : {0.0, 0.3}) {
      run_inf_case(r, p);
    }
  }
  run_dtype<float>("float32");
  run_dtype<c10::Half>("float16");
  run_dtype<c10::BFloat16>("bfloat16");
  if (g_failures != 0) {
    std::printf("%d failed checks in %d cases\n", g_failures, g_cases);
    return 1;
  }
  std::printf("all %d cases passed\n", g_cases);
  return 0;
}
