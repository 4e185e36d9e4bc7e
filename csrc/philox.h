// The LoRA-branch dropout mask, shared by the CPU and CUDA code of the extension.
//
// This is a transcription of lora_kernels/dropout.py, which is the specification, for x viewed as a
// row-major (M, K) matrix of *logical* indices. One Philox call gives 8 mask elements: Philox-4x32-10 with
// key (seed & 0xFFFFFFFF, seed >> 32) and counter (col / 8, row & 0xFFFFFFFF, row >> 32, 0); element
// j = col % 8 takes word j / 2 of the output, its low 16 bits for even j and its high 16 bits for odd j,
// and is kept when that value is >= round(p * 2**16) (p quantised to 2**-16). Kept elements are scaled
// by 1 / (1 - p), with the caller's p. Every function here is __host__ __device__ so the CPU path and the
// kernels regenerate the same mask bit for bit. The seed itself is read from an int64 tensor (DropoutParams).
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
constexpr int kDropoutValueBits = 16;       // bits of the random value of one mask element
constexpr int kDropoutElementsPerCall = 8;  // mask elements (consecutive columns) per Philox call

// High 32 bits of the 64-bit product a * b.
LORA_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox-4x32-10 of counter (group, row_lo, row_hi, 0), as philox4x32 in dropout.py: the key is bumped
// after every round, including the last. `words` receives the four output words.
LORA_HOST_DEVICE void philox_group_words(uint64_t seed, uint64_t row, uint64_t group, uint32_t (&words)[4]) {
  uint32_t key0 = static_cast<uint32_t>(seed);
  uint32_t key1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(group);
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
  words[0] = c0;
  words[1] = c1;
  words[2] = c2;
  words[3] = c3;
}

// The 16-bit value of element j (0..7) of a group: word j / 2, low half for even j, high half for odd j.
LORA_HOST_DEVICE uint32_t group_value(const uint32_t (&words)[4], int j) {
  return (words[j >> 1] >> ((j & 1) * kDropoutValueBits)) & 0xFFFFu;
}

// What a kernel needs to regenerate the mask. `enabled` is false for p == 0 (every element kept, no
// Philox evaluated). The 1 / (1 - p) scale is not here: kernels fold it into their fp32 epilogue.
// The seed is not a launch argument: `seed_ptr` points at the int64 seed tensor (device memory for a
// kernel, host memory on the CPU), so a CUDA graph replays with whatever value the tensor holds then (a
// fresh draw from torch's generator per replay), and `resolve_seed` reads it once where the params are used.
struct DropoutParams {
  const int64_t* seed_ptr;
  uint64_t seed;  // *seed_ptr once resolve_seed ran
  uint32_t threshold;
  bool enabled;
};

// Read the seed behind `seed_ptr` (at the start of a kernel, or on the host for CPU memory).
LORA_HOST_DEVICE void resolve_seed(DropoutParams& params) {
  params.seed = params.enabled ? static_cast<uint64_t>(*params.seed_ptr) : 0;
}

// round(p * 2**16) (0 .. 65536) with Python's round-half-to-even, which std::nearbyint gives in the default
// rounding mode; p * 2**16 is exact in double, so this equals dropout_threshold(p) in dropout.py.
inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(std::nearbyint(p * static_cast<double>(1u << kDropoutValueBits)));
}

// The params of a launch; the seed is read later, by resolve_seed (seed_ptr may be device memory).
inline DropoutParams make_dropout_params(double p, const int64_t* seed_ptr) {
  DropoutParams params;
  params.seed_ptr = seed_ptr;
  params.seed = 0;
  params.threshold = dropout_threshold(p);
  params.enabled = p > 0.0;
  return params;
}

// Which of the 8 columns 8·group .. 8·group + 7 of row `row` survive dropout: bit j of the result is column
// 8·group + j. One Philox call; every bit set when dropout is off.
LORA_HOST_DEVICE uint32_t dropout_keep_bits(const DropoutParams& params, int64_t row, int64_t group) {
  if (!params.enabled) {
    return 0xFFu;
  }
  uint32_t words[4];
  philox_group_words(params.seed, static_cast<uint64_t>(row), static_cast<uint64_t>(group), words);
  uint32_t bits = 0;
  LORA_UNROLL
  for (int j = 0; j < kDropoutElementsPerCall; ++j) {
    bits |= static_cast<uint32_t>(group_value(words, j) >= params.threshold) << j;
  }
  return bits;
}

// Whether element (row, col) of the logical (M, K) input survives dropout. A whole Philox call for one
// element: kernels that visit 8 consecutive columns use dropout_keep_bits once instead.
LORA_HOST_DEVICE bool dropout_keep(const DropoutParams& params, int64_t row, int64_t col) {
  return (dropout_keep_bits(params, row, col / kDropoutElementsPerCall) >> (col % kDropoutElementsPerCall)) & 1u;
}

}  // namespace lora_kernels
