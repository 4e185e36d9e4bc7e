// lora_kernels._C: op schemas, argument checks, the CPU and Meta implementations, and the module stub.
//
// The ops split the fused LoRA linear y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ into the pieces the autograd
// Function in Python calls (see lora_kernels/ops/cuda_lora.py):
//
//   lora_project       t  = s·dropout(x)·Aᵀ                      (M, r) float32 (the backend: s = 1)
//   lora_linear_fwd    y  = x·Wᵀ + b + s·(t·Bᵀ)                  (M, N) x.dtype
//   lora_grad_t_and_B  gt = s·(dY·B), dB = dYᵀ·t                 (M, r) dY.dtype, (N, r) float32
//   lora_grad_A        dA = gtᵀ·dropout(x)                       (r, K) float32
//   lora_grad_x        dX = dY·W + dropout'(gt·A)                (M, K) dY.dtype
//
// lora_linear_fwd and lora_grad_x run the split path (lora_kernels/ops/routing.py): the LoRA term is written
// into the output's storage and the base GEMM (cuBLAS on CUDA) accumulated into it with beta = 1.
//   lora_dropout_mask  the float32 mask of an input of a given size (tests, debugging; never stored by the ops)
//   lora_dropout_bits  the same mask packed, one byte per Philox group of 8 columns (CPU: kept for backward)
//   lora_dropout_apply x ⊙ mask from those bytes                (M, K) x.dtype (CPU)
//   lora_dropout_keep  (x ⊙ mask, its bytes, the seed) in one call, the seed drawn if none is given (CPU)
//
// The seed is an int64 tensor of one element on the input's device (None where dropout_p is 0): the CUDA
// kernels read it through its pointer, so a CUDA graph replays with the value the tensor holds then.
//
// The CPU implementation below is an ATen composite that follows lora_kernels/ops/torch_lora.py op for op,
// with the Philox mask from philox.h; the CUDA kernels live in lora_kernels.cuh, launched from lora_fwd.cu
// and lora_bwd.cu.
#include <Python.h>  // first, as the Python docs ask

#include "lora_ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <sstream>

#include "philox.h"

namespace lora_kernels {

std::string describe(const at::Tensor& t) {
  if (!t.defined()) {
    return "an undefined tensor";
  }
  std::ostringstream os;
  os << "shape " << t.sizes() << ", dtype " << t.scalar_type() << ", device " << t.device();
  return os.str();
}

namespace {

bool is_compute_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_matrix(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be a 2-D tensor, got ", describe(t));
}

// The matrix every other argument of the op is compared against (x, or grad_y): float16, bfloat16 or float32.
void check_reference(const char* op, const char* name, const at::Tensor& t) {
  check_matrix(op, name, t);
  TORCH_CHECK(is_compute_dtype(t.scalar_type()), op, ": ", name,
              " must be float16, bfloat16 or float32, got ", describe(t));
}

// What dtype an operand may have, given the reference's.
enum class Dtype {
  kSame,     // the reference's (the base weight, bias, grad_t)
  kAdapter,  // the reference's or float32: PEFT keeps float32 adapters on a half-precision base; they are
             // cast to the compute dtype inside the op (a copy of r·K or N·r elements, never of x)
  kFloat32,  // float32: t, the output of lora_project
};

// On the reference's device, with a dtype that `rule` allows.
void check_placed(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                  const at::Tensor& ref, Dtype rule) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the same device as ", ref_name, " (",
              ref.device(), "), got ", describe(t));
  const at::ScalarType dtype = t.scalar_type();
  if (rule == Dtype::kFloat32) {
    TORCH_CHECK(dtype == at::kFloat, op, ": ", name, " must be float32 (the output of lora_project), got ",
                describe(t));
    return;
  }
  const bool adapter = rule == Dtype::kAdapter;
  TORCH_CHECK(dtype == ref.scalar_type() || (adapter && dtype == at::kFloat), op, ": ", name,
              " must have the dtype of ", ref_name, " (", ref.scalar_type(), ")", adapter ? " or float32" : "",
              ", got ", describe(t));
}

// A 2-D operand, placed as check_placed says.
void check_operand(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                   const at::Tensor& ref, Dtype rule) {
  check_matrix(op, name, t);
  check_placed(op, name, t, ref_name, ref, rule);
}

void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim, int64_t expected,
                const char* what) {
  TORCH_CHECK(t.size(dim) == expected, op, ": ", name, ".size(", dim, ") must equal ", what, " = ", expected,
              ", got ", describe(t));
}

void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  const int64_t r = t.size(dim);
  TORCH_CHECK(r >= 1 && r <= kMaxRank, op, ": the LoRA rank ", name, ".size(", dim, ") must be in [1, ",
              kMaxRank, "], got ", describe(t));
}

void check_dropout(const char* op, double dropout_p, const std::optional<at::Tensor>& seed, at::Device device) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p == 0.0) {
    return;  // no mask: the seed, if any, is not read
  }
  TORCH_CHECK(seed.has_value() && seed->defined(), op, ": dropout_p > 0 needs a seed tensor");
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1, op,
              ": seed must be an int64 tensor of one element, got ", describe(*seed));
  TORCH_CHECK(seed->device() == device, op, ": seed must be on the input's device ", device, ", got ",
              describe(*seed));
  if (seed->device().is_cpu()) {  // a device seed is not read on the host (no sync)
    const int64_t value = seed->item<int64_t>();
    TORCH_CHECK(value >= 0, op, ": seed must be in [0, 2**63), got ", value);
  }
}

}  // namespace

void check_project_args(const at::Tensor& x, const at::Tensor& lora_A, double dropout_p,
                        const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "lora_project";
  check_reference(op, "x", x);
  check_operand(op, "lora_A", lora_A, "x", x, Dtype::kAdapter);
  check_rank(op, "lora_A", lora_A, 0);
  check_size(op, "lora_A", lora_A, 1, x.size(1), "x.size(1) (in_features)");
  check_dropout(op, dropout_p, seed, x.device());
}

void check_linear_fwd_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& t, const at::Tensor& lora_B) {
  constexpr const char* op = "lora_linear_fwd";
  check_reference(op, "x", x);
  check_operand(op, "weight", weight, "x", x, Dtype::kSame);
  check_size(op, "weight", weight, 1, x.size(1), "x.size(1) (in_features)");
  const int64_t n = weight.size(0);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1, op, ": bias must be a 1-D (out_features,) tensor, got ", describe(*bias));
    check_placed(op, "bias", *bias, "x", x, Dtype::kSame);
    check_size(op, "bias", *bias, 0, n, "weight.size(0) (out_features)");
  }
  check_operand(op, "t", t, "x", x, Dtype::kFloat32);
  check_size(op, "t", t, 0, x.size(0), "x.size(0) (rows)");
  check_rank(op, "t", t, 1);
  check_operand(op, "lora_B", lora_B, "x", x, Dtype::kAdapter);
  check_size(op, "lora_B", lora_B, 0, n, "weight.size(0) (out_features)");
  check_size(op, "lora_B", lora_B, 1, t.size(1), "t.size(1) (rank)");
}

void check_grad_t_and_B_args(const at::Tensor& grad_y, const at::Tensor& lora_B, const at::Tensor& t) {
  constexpr const char* op = "lora_grad_t_and_B";
  check_reference(op, "grad_y", grad_y);
  check_operand(op, "lora_B", lora_B, "grad_y", grad_y, Dtype::kAdapter);
  check_rank(op, "lora_B", lora_B, 1);
  check_size(op, "lora_B", lora_B, 0, grad_y.size(1), "grad_y.size(1) (out_features)");
  check_operand(op, "t", t, "grad_y", grad_y, Dtype::kFloat32);
  check_size(op, "t", t, 0, grad_y.size(0), "grad_y.size(0) (rows)");
  check_size(op, "t", t, 1, lora_B.size(1), "lora_B.size(1) (rank)");
}

void check_grad_A_args(const at::Tensor& grad_t, const at::Tensor& x, double dropout_p,
                       const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "lora_grad_A";
  check_reference(op, "x", x);
  check_operand(op, "grad_t", grad_t, "x", x, Dtype::kSame);
  check_size(op, "grad_t", grad_t, 0, x.size(0), "x.size(0) (rows)");
  check_rank(op, "grad_t", grad_t, 1);
  check_dropout(op, dropout_p, seed, x.device());
}

void check_grad_x_args(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& grad_t,
                       const at::Tensor& lora_A, double dropout_p, const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "lora_grad_x";
  check_reference(op, "grad_y", grad_y);
  check_operand(op, "weight", weight, "grad_y", grad_y, Dtype::kSame);
  check_size(op, "weight", weight, 0, grad_y.size(1), "grad_y.size(1) (out_features)");
  check_operand(op, "grad_t", grad_t, "grad_y", grad_y, Dtype::kSame);
  check_size(op, "grad_t", grad_t, 0, grad_y.size(0), "grad_y.size(0) (rows)");
  check_rank(op, "grad_t", grad_t, 1);
  check_operand(op, "lora_A", lora_A, "grad_y", grad_y, Dtype::kAdapter);
  check_size(op, "lora_A", lora_A, 0, grad_t.size(1), "grad_t.size(1) (rank)");
  check_size(op, "lora_A", lora_A, 1, weight.size(1), "weight.size(1) (in_features)");
  check_dropout(op, dropout_p, seed, grad_y.device());
}

void check_dropout_mask_args(at::IntArrayRef size, double dropout_p, const at::Tensor& seed) {
  constexpr const char* op = "lora_dropout_mask";
  TORCH_CHECK(!size.empty(), op, ": size needs at least one dimension (..., in_features)");
  for (const int64_t s : size) {
    TORCH_CHECK(s >= 0, op, ": size must not be negative, got ", size);
  }
  check_dropout(op, dropout_p, seed, seed.device());
}

at::Tensor lora_linear_fwd_aten(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& t,
                                const at::Tensor& lora_B, double scaling) {
  check_linear_fwd_args(x, weight, bias, t, lora_B);
  const auto dtype = x.scalar_type();
  // The split path: the LoRA term b + s·(t·Bᵀ) is written into y's storage, then the base GEMM accumulates
  // into it (beta = 1): no second (M, N) tensor, y written once by the LoRA term and read once inside the
  // base GEMM's epilogue. t is cast to x.dtype (an (M, r) copy) so the GEMM runs in the compute dtype, as in
  // every backend; s is the GEMM's alpha, applied to the float32 accumulator, so a large s cannot overflow a
  // float16 t. Without a bias, beta = 0: the uninitialised storage is not read.
  const at::Tensor t_c = t.to(dtype);
  const at::Tensor B_t = lora_B.to(dtype).t();
  at::Tensor y = (bias.has_value() && bias->defined())
                     ? at::addmm(*bias, t_c, B_t, /*beta=*/1, /*alpha=*/scaling)
                     : at::empty({x.size(0), weight.size(0)}, x.options()).addmm_(t_c, B_t, /*beta=*/0, scaling);
  y.addmm_(x, weight.t());
  return y;
}

namespace {

// ---------------------------------------------------------------------------------------------------------
// CPU: ATen composite, the same math as lora_kernels/ops/torch_lora.py.
// ---------------------------------------------------------------------------------------------------------

// The (M, K) float32 mask: 1 / (1 - p) where kept, 0 where dropped.
// The params of a CPU seed tensor, its value read.
DropoutParams cpu_dropout_params(double dropout_p, const at::Tensor& seed) {
  DropoutParams params = make_dropout_params(dropout_p, seed.const_data_ptr<int64_t>());
  resolve_seed(params);
  return params;
}

at::Tensor dropout_mask_cpu(int64_t rows, int64_t cols, double dropout_p, const at::Tensor& seed) {
  at::Tensor mask = at::empty({rows, cols}, at::TensorOptions().dtype(at::kFloat));
  const DropoutParams params = cpu_dropout_params(dropout_p, seed);
  const float scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  float* out = mask.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      // One Philox call per 8 columns (the last group of a row may reach past `cols`).
      for (int64_t col0 = 0; col0 < cols; col0 += kDropoutElementsPerCall) {
        const uint32_t bits = dropout_keep_bits(params, row, col0 / kDropoutElementsPerCall);
        const int64_t n = std::min<int64_t>(kDropoutElementsPerCall, cols - col0);
        for (int64_t j = 0; j < n; ++j) {
          out[row * cols + col0 + j] = ((bits >> j) & 1u) ? scale : 0.0f;
        }
      }
    }
  });
  return mask;
}

at::Tensor dropped_cpu(const at::Tensor& x, double dropout_p, const std::optional<at::Tensor>& seed) {
  if (dropout_p == 0.0) {
    return x;
  }
  return x * dropout_mask_cpu(x.size(0), x.size(1), dropout_p, *seed).to(x.scalar_type());
}

// The keep bits of a (rows, cols) input: byte (row, g) bit j is column 8·g + j, one Philox call a byte.
at::Tensor dropout_bits_cpu(int64_t rows, int64_t cols, double dropout_p, const at::Tensor& seed) {
  const int64_t groups = (cols + kDropoutElementsPerCall - 1) / kDropoutElementsPerCall;
  at::Tensor bits = at::empty({rows, groups}, at::TensorOptions().dtype(at::kByte));
  const DropoutParams params = cpu_dropout_params(dropout_p, seed);
  uint8_t* out = bits.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t g = 0; g < groups; ++g) {
        out[row * groups + g] = static_cast<uint8_t>(dropout_keep_bits(params, row, g));
      }
    }
  });
  return bits;
}

// x ⊙ mask, the mask read from `bits` (dropout_bits_cpu's layout) and scaled by `scale`; (M, K) contiguous.
template <typename scalar_t>
void apply_bits_cpu(const at::Tensor& x, const at::Tensor& bits, float scale, at::Tensor& out) {
  const int64_t rows = x.size(0);
  const int64_t cols = x.size(1);
  const int64_t groups = bits.size(1);
  const int64_t sm = x.stride(0);
  const int64_t sk = x.stride(1);
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  const uint8_t* keep = bits.const_data_ptr<uint8_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  // One byte per 8 columns, looked up as its 8 factors (scale or 0): a product, not a select, as x * mask
  // (a dropped NaN stays NaN), 8 lanes the compiler vectorises.
  constexpr int kE = kDropoutElementsPerCall;
  std::array<std::array<float, kE>, 256> factors;
  for (int byte = 0; byte < 256; ++byte) {
    for (int j = 0; j < kE; ++j) {
      factors[byte][j] = ((byte >> j) & 1) ? scale : 0.0f;
    }
  }
  const auto row_pass = [&](const scalar_t* x_row, int64_t step, const uint8_t* row_bits, scalar_t* out_row) {
    const int64_t full = cols / kE;
    for (int64_t g = 0; g < full; ++g) {
      const float* f = factors[row_bits[g]].data();
      const scalar_t* src = x_row + g * kE * step;
      scalar_t* dst_g = out_row + g * kE;
      for (int j = 0; j < kE; ++j) {
        dst_g[j] = static_cast<scalar_t>(static_cast<float>(src[j * step]) * f[j]);
      }
    }
    if (full < groups) {  // the last, partial byte of the row
      const float* f = factors[row_bits[full]].data();
      for (int64_t col = full * kE; col < cols; ++col) {
        out_row[col] = static_cast<scalar_t>(static_cast<float>(x_row[col * step]) * f[col - full * kE]);
      }
    }
  };
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      if (sk == 1) {  // the common layout: a unit stride the compiler can see
        row_pass(in + row * sm, 1, keep + row * groups, dst + row * cols);
      } else {
        row_pass(in + row * sm, sk, keep + row * groups, dst + row * cols);
      }
    }
  });
}

at::Tensor lora_project_cpu(const at::Tensor& x, const at::Tensor& lora_A, double scaling, double dropout_p,
                            const std::optional<at::Tensor>& seed) {
  check_project_args(x, lora_A, dropout_p, seed);
  const auto dtype = x.scalar_type();
  at::Tensor t = at::mm(dropped_cpu(x, dropout_p, seed), lora_A.to(dtype).t()).to(at::kFloat);
  return t.mul_(scaling);
}

at::Tensor lora_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& t,
                               const at::Tensor& lora_B, double scaling) {
  return lora_linear_fwd_aten(x, weight, bias, t, lora_B, scaling);
}

std::tuple<at::Tensor, at::Tensor> lora_grad_t_and_B_cpu(const at::Tensor& grad_y, const at::Tensor& lora_B,
                                                         const at::Tensor& t, double scaling) {
  check_grad_t_and_B_args(grad_y, lora_B, t);
  const auto dtype = grad_y.scalar_type();
  at::Tensor grad_t = at::mm(grad_y, lora_B.to(dtype)).to(at::kFloat).mul_(scaling).to(dtype);
  at::Tensor grad_B = at::mm(grad_y.t(), t.to(dtype)).to(at::kFloat);
  return {grad_t, grad_B};
}

at::Tensor lora_grad_A_cpu(const at::Tensor& grad_t, const at::Tensor& x, double dropout_p,
                           const std::optional<at::Tensor>& seed) {
  check_grad_A_args(grad_t, x, dropout_p, seed);
  return at::mm(grad_t.t(), dropped_cpu(x, dropout_p, seed)).to(at::kFloat);
}

at::Tensor lora_grad_x_cpu(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& grad_t,
                           const at::Tensor& lora_A, double dropout_p, const std::optional<at::Tensor>& seed) {
  check_grad_x_args(grad_y, weight, grad_t, lora_A, dropout_p, seed);
  const auto dtype = grad_y.scalar_type();
  // The split path: the (masked) LoRA term first, dY·W accumulated into it (beta = 1).
  at::Tensor grad_x = dropped_cpu(at::mm(grad_t, lora_A.to(dtype)), dropout_p, seed);
  grad_x.addmm_(grad_y, weight);
  return grad_x;
}

// The mask of an input of `size`, its leading dims flattened into rows as the ops see x.reshape(-1, K).
at::Tensor lora_dropout_mask_cpu(at::IntArrayRef size, double dropout_p, const at::Tensor& seed) {
  check_dropout_mask_args(size, dropout_p, seed);
  const int64_t cols = size.back();
  return dropout_mask_cpu(c10::multiply_integers(size.begin(), size.end() - 1), cols, dropout_p, seed).view(size);
}

at::Tensor lora_dropout_bits_cpu(at::IntArrayRef size, double dropout_p, const at::Tensor& seed) {
  check_dropout_mask_args(size, dropout_p, seed);
  return dropout_bits_cpu(c10::multiply_integers(size.begin(), size.end() - 1), size.back(), dropout_p, seed);
}

void check_dropout_apply_args(const at::Tensor& x, const at::Tensor& bits) {
  constexpr const char* op = "lora_dropout_apply";
  check_reference(op, "x", x);
  TORCH_CHECK(bits.scalar_type() == at::kByte && bits.dim() == 2 && bits.is_contiguous(), op,
              ": bits must be a contiguous 2-D uint8 tensor (lora_dropout_bits), got ", describe(bits));
  TORCH_CHECK(bits.device() == x.device(), op, ": bits must be on x's device, got ", describe(bits));
  TORCH_CHECK(bits.size(0) == x.size(0) && bits.size(1) == (x.size(1) + kDropoutElementsPerCall - 1) /
                                                               kDropoutElementsPerCall,
              op, ": bits ", describe(bits), " do not match x ", describe(x));
}

at::Tensor lora_dropout_apply_cpu(const at::Tensor& x, const at::Tensor& bits, double scale) {
  check_dropout_apply_args(x, bits);
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_dropout_apply_cpu",
                                  [&] { apply_bits_cpu<scalar_t>(x, bits, static_cast<float>(scale), out); });
  return out;
}
// The seed of a call without one: drawn as lora_kernels.dropout.draw_seed draws it (torch.randint(0, 2**63 - 1)
// on the device's default generator), so a call gives the same mask whichever draws it.
at::Tensor draw_seed_like(const at::Tensor& x) {
  return at::randint(0, std::numeric_limits<int64_t>::max(), {}, x.options().dtype(at::kLong));
}

void check_dropout_keep_args(const at::Tensor& x, double dropout_p, const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "lora_dropout_keep";
  check_reference(op, "x", x);
  TORCH_CHECK(dropout_p > 0.0 && dropout_p < 1.0, op, ": dropout_p must be in (0, 1), got ", dropout_p);
  if (seed.has_value() && seed->defined()) {
    check_dropout(op, dropout_p, seed, x.device());
  }
}

// The forward of a call with dropout in one op: (x ⊙ mask, the mask packed as lora_dropout_bits packs it, the
// seed), the seed drawn here when none is given (a copy of the given one otherwise: outputs never alias inputs). One call from Python where three were (the seed's draw,
// the bits, their use): on a tiny problem each such call cost several µs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_dropout_keep_cpu(const at::Tensor& x, double dropout_p,
                                                                     const std::optional<at::Tensor>& seed) {
  check_dropout_keep_args(x, dropout_p, seed);
  at::Tensor seed_ = seed.has_value() && seed->defined() ? seed->reshape({}).clone() : draw_seed_like(x);
  at::Tensor bits = dropout_bits_cpu(x.size(0), x.size(1), dropout_p, seed_);
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  const float scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_dropout_keep_cpu",
                                  [&] { apply_bits_cpu<scalar_t>(x, bits, scale, out); });
  return {out, bits, seed_};
}

// ---------------------------------------------------------------------------------------------------------
// Meta: shapes and dtypes only, for FakeTensor tracing (torch.compile, opcheck).
// ---------------------------------------------------------------------------------------------------------

at::Tensor lora_project_meta(const at::Tensor& x, const at::Tensor& lora_A, double scaling, double dropout_p,
                             const std::optional<at::Tensor>& seed) {
  check_project_args(x, lora_A, dropout_p, seed);
  return at::empty({x.size(0), lora_A.size(0)}, x.options().dtype(at::kFloat));
}

at::Tensor lora_linear_fwd_meta(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& t,
                                const at::Tensor& lora_B, double scaling) {
  check_linear_fwd_args(x, weight, bias, t, lora_B);
  return at::empty({x.size(0), weight.size(0)}, x.options());
}

std::tuple<at::Tensor, at::Tensor> lora_grad_t_and_B_meta(const at::Tensor& grad_y, const at::Tensor& lora_B,
                                                          const at::Tensor& t, double scaling) {
  check_grad_t_and_B_args(grad_y, lora_B, t);
  return {at::empty({grad_y.size(0), lora_B.size(1)}, grad_y.options()),
          at::empty({grad_y.size(1), lora_B.size(1)}, grad_y.options().dtype(at::kFloat))};
}

at::Tensor lora_grad_A_meta(const at::Tensor& grad_t, const at::Tensor& x, double dropout_p,
                            const std::optional<at::Tensor>& seed) {
  check_grad_A_args(grad_t, x, dropout_p, seed);
  return at::empty({grad_t.size(1), x.size(1)}, x.options().dtype(at::kFloat));
}

at::Tensor lora_grad_x_meta(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& grad_t,
                            const at::Tensor& lora_A, double dropout_p, const std::optional<at::Tensor>& seed) {
  check_grad_x_args(grad_y, weight, grad_t, lora_A, dropout_p, seed);
  return at::empty({grad_y.size(0), weight.size(1)}, grad_y.options());
}

at::Tensor lora_dropout_mask_meta(at::IntArrayRef size, double dropout_p, const at::Tensor& seed) {
  check_dropout_mask_args(size, dropout_p, seed);
  return at::empty(size, seed.options().dtype(at::kFloat));
}

at::Tensor lora_dropout_bits_meta(at::IntArrayRef size, double dropout_p, const at::Tensor& seed) {
  check_dropout_mask_args(size, dropout_p, seed);
  const int64_t rows = c10::multiply_integers(size.begin(), size.end() - 1);
  return at::empty({rows, (size.back() + kDropoutElementsPerCall - 1) / kDropoutElementsPerCall},
                   seed.options().dtype(at::kByte));
}

at::Tensor lora_dropout_apply_meta(const at::Tensor& x, const at::Tensor& bits, double scale) {
  check_dropout_apply_args(x, bits);
  return at::empty({x.size(0), x.size(1)}, x.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_dropout_keep_meta(const at::Tensor& x, double dropout_p,
                                                                      const std::optional<at::Tensor>& seed) {
  check_dropout_keep_args(x, dropout_p, seed);
  const int64_t groups = (x.size(1) + kDropoutElementsPerCall - 1) / kDropoutElementsPerCall;
  return {at::empty({x.size(0), x.size(1)}, x.options()), at::empty({x.size(0), groups}, x.options().dtype(at::kByte)),
          at::empty({}, x.options().dtype(at::kLong))};
}
}  // namespace
}  // namespace lora_kernels

// Each op's schema, then its kernels: CPU and Meta (above), CUDA (lora_fwd.cu, lora_bwd.cu) in a CUDA build.
// A fragment rather than TORCH_LIBRARY: the Python side may add its own ops (torch.library.custom_op) to the
// same `lora_kernels` namespace, and only one non-fragment definition of a namespace is allowed.
#if LORA_KERNELS_WITH_CUDA
#define LORA_CUDA_KERNEL(name) &lora_kernels::cuda::name
#else
#define LORA_CUDA_KERNEL(name) nullptr
#endif

TORCH_LIBRARY_FRAGMENT(lora_kernels, m) {
  using c10::DispatchKey;
  using namespace lora_kernels;
  const auto kernels = [&m](const char* op, auto cpu, auto meta, [[maybe_unused]] auto cuda) {
    m.impl(op, torch::dispatch(DispatchKey::CPU, cpu));
    m.impl(op, torch::dispatch(DispatchKey::Meta, meta));
#if LORA_KERNELS_WITH_CUDA
    m.impl(op, torch::dispatch(DispatchKey::CUDA, cuda));
#endif
  };
  m.def("lora_project(Tensor x, Tensor lora_A, float scaling, float dropout_p, Tensor? seed) -> Tensor");
  kernels("lora_project", &lora_project_cpu, &lora_project_meta, LORA_CUDA_KERNEL(lora_project_cuda));
  m.def(
      "lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor t, Tensor lora_B, float scaling=1.0) -> "
      "Tensor");
  kernels("lora_linear_fwd", &lora_linear_fwd_cpu, &lora_linear_fwd_meta, LORA_CUDA_KERNEL(lora_linear_fwd_cuda));
  m.def("lora_grad_t_and_B(Tensor grad_y, Tensor lora_B, Tensor t, float scaling) -> (Tensor, Tensor)");
  kernels("lora_grad_t_and_B", &lora_grad_t_and_B_cpu, &lora_grad_t_and_B_meta,
          LORA_CUDA_KERNEL(lora_grad_t_and_B_cuda));
  m.def("lora_grad_A(Tensor grad_t, Tensor x, float dropout_p, Tensor? seed) -> Tensor");
  kernels("lora_grad_A", &lora_grad_A_cpu, &lora_grad_A_meta, LORA_CUDA_KERNEL(lora_grad_A_cuda));
  m.def(
      "lora_grad_x(Tensor grad_y, Tensor weight, Tensor grad_t, Tensor lora_A, float dropout_p, Tensor? seed) -> "
      "Tensor");
  kernels("lora_grad_x", &lora_grad_x_cpu, &lora_grad_x_meta, LORA_CUDA_KERNEL(lora_grad_x_cuda));
  // The mask on the seed's device (the seed tensor is what the dispatcher sees).
  m.def("lora_dropout_mask(int[] size, float dropout_p, Tensor seed) -> Tensor");
  kernels("lora_dropout_mask", &lora_dropout_mask_cpu, &lora_dropout_mask_meta,
          LORA_CUDA_KERNEL(lora_dropout_mask_cuda));
  // The packed mask and its use (CPU: the torch backend keeps it from the forward for the backward).
  m.def("lora_dropout_bits(int[] size, float dropout_p, Tensor seed) -> Tensor");
  m.impl("lora_dropout_bits", torch::dispatch(DispatchKey::CPU, &lora_dropout_bits_cpu));
  m.impl("lora_dropout_bits", torch::dispatch(DispatchKey::Meta, &lora_dropout_bits_meta));
  m.def("lora_dropout_apply(Tensor x, Tensor bits, float scale) -> Tensor");
  m.impl("lora_dropout_apply", torch::dispatch(DispatchKey::CPU, &lora_dropout_apply_cpu));
  m.impl("lora_dropout_apply", torch::dispatch(DispatchKey::Meta, &lora_dropout_apply_meta));
  m.def("lora_dropout_keep(Tensor x, float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor)");
  m.impl("lora_dropout_keep", torch::dispatch(DispatchKey::CPU, &lora_dropout_keep_cpu));
  m.impl("lora_dropout_keep", torch::dispatch(DispatchKey::Meta, &lora_dropout_keep_meta));
}

// `import lora_kernels._C` loads this library, which runs the registrations above; the module itself only
// says whether the CUDA kernels were compiled in.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "Fused LoRA linear ops, registered under torch.ops.lora_kernels.",
      -1,
      nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddIntConstant(module, "WITH_CUDA", LORA_KERNELS_WITH_CUDA) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
