// The LoRA-branch dropout mask, shared by the CPU and CUDA code of the extension.
//
// This is a transcription of lora_kernels/dropout.py, which is the specification: Philox-4x32-10 with key
// (seed & 0xFFFFFFFF, seed >> 32) and counter (col, row & 0xFFFFFFFF, row >> 32, 0), for x viewed as
// a row-major (M, K) matrix of *logical* indices; the first output word r keeps the element when
// (r >> 8) >= round(p * 2**24). Kept elements are scaled by 1 / (1 - p). Every function here is
// __host__ __device__ so the CPU path and the kernels regenerate the same mask bit for bit; nothing is
// stored between forward and backward.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LORA_HOST_DEVICE __host__ __device__ __forceinline__
#define LORA_UNROLL _Pragma("unroll")
#else
#define LORA_HOST_DEVICE inline
#define LORA_UNROLL
#endif

namespace lora_kernels {

constexpr int kPhiloxRounds = 10;
constexpr uint32_t kPhiloxMul0 = 0xD2511F53u;
constexpr uint32_t kPhiloxMul1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyBump0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyBump1 = 0xBB67AE85u;
constexpr int kDropoutThresholdBits = 24;

// High 32 bits of the 64-bit product a * b.
LORA_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// First output word of Philox-4x32-10 for counter (col, row_lo, row_hi, 0), as philox_first_word in
// dropout.py: the key is bumped after every round, including the last (which does not change word 0).
LORA_HOST_DEVICE uint32_t philox_first_word(uint64_t seed, uint64_t row, uint64_t col) {
  uint32_t key0 = static_cast<uint32_t>(seed);
  uint32_t key1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(col);
  uint32_t c1 = static_cast<uint32_t>(row);
  uint32_t c2 = static_cast<uint32_t>(row >> 32);
  uint32_t c3 = 0;
  LORA_UNROLL
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t hi0 = mulhi32(kPhiloxMul0, c0);
    const uint32_t lo0 = kPhiloxMul0 * c0;
    const uint32_t hi1 = mulhi32(kPhiloxMul1, c2);
    const uint32_t lo1 = kPhiloxMul1 * c2;
    c0 = hi1 ^ c1 ^ key0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ key1;
    c3 = lo0;
    key0 += kPhiloxKeyBump0;
    key1 += kPhiloxKeyBump1;
  }
  return c0;
}

// What a kernel needs to regenerate the mask. `enabled` is false for p == 0 (every element kept, no
// Philox evaluated). The 1 / (1 - p) scale is not here: kernels fold it into their fp32 epilogue.
struct DropoutParams {
  uint64_t seed;
  uint32_t threshold;
  bool enabled;
};

// round(p * 2**24) with Python's round-half-to-even, which std::nearbyint gives in the default rounding
// mode; p * 2**24 is exact in double, so this equals dropout_threshold(p) in dropout.py.
inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(std::nearbyint(p * static_cast<double>(1u << kDropoutThresholdBits)));
}

inline DropoutParams make_dropout_params(double p, int64_t seed) {
  DropoutParams params;
  params.seed = static_cast<uint64_t>(seed);
  params.threshold = dropout_threshold(p);
  params.enabled = p > 0.0;
  return params;
}

// Whether element (row, col) of the logical (M, K) input survives dropout.
LORA_HOST_DEVICE bool dropout_keep(const DropoutParams& params, int64_t row, int64_t col) {
  if (!params.enabled) {
    return true;
  }
  const uint32_t word = philox_first_word(params.seed, static_cast<uint64_t>(row), static_cast<uint64_t>(col));
  return (word >> (32 - kDropoutThresholdBits)) >= params.threshold;
}

}  // namespace lora_kernels
