"""The dropout mask of the LoRA branch: one counter-based RNG shared by every backend.

Every backend (Triton kernels, the CUDA extension, the torch composite) draws the LoRA-branch dropout mask
from the same function of ``(seed, row, column)``, so a mask is never stored: the backward pass
regenerates it, and tests reproduce it exactly with :func:`dropout_mask`.

The scheme, for ``x`` viewed as a 2-D ``(M, K)`` matrix (leading dims flattened, row-major):

* Philox-4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
  key ``(seed & 0xFFFFFFFF, seed >> 32)``, counter ``(col, row & 0xFFFFFFFF, row >> 32, 0)``;
* the first output word ``r`` keeps the element when ``(r >> 8) >= round(p * 2**24)``;
* kept elements are scaled by ``1 / (1 - p)``, dropped ones are zero (inverted dropout, as ``nn.Dropout``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Shape = Sequence[int] | torch.Size
Device = torch.device | str | None

PHILOX_ROUNDS = 10
PHILOX_MUL_0 = 0xD2511F53
PHILOX_MUL_1 = 0xCD9E8D57
PHILOX_KEY_BUMP_0 = 0x9E3779B9
PHILOX_KEY_BUMP_1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF
_THRESHOLD_BITS = 24


def dropout_threshold(p: float) -> int:
    """The 24-bit integer threshold under which a random word drops its element."""
    return round(p * (1 << _THRESHOLD_BITS))


def split_seed(seed: int) -> tuple[int, int]:
    """Split a 63-bit seed into the two 32-bit Philox key words (low, high)."""
    if not 0 <= seed < 2**63:
        raise ValueError(f"dropout seed must be in [0, 2**63), got {seed}")
    return seed & _MASK32, (seed >> 32) & _MASK32


def new_seed(generator: torch.Generator | None = None) -> int:
    """Draw a fresh 63-bit seed from torch's (CPU) generator, so ``torch.manual_seed`` fixes the masks."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, generator=generator))


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for a 32-bit constant ``a`` and int64 tensor ``b < 2**32``.

    The 64-bit product does not fit a signed int64, so it is assembled from 16-bit halves.
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    low = a_lo * b_lo
    mid = a_hi * b_lo + a_lo * b_hi  # < 2**33
    high = a_hi * b_hi + ((mid + (low >> 16)) >> 16)
    return high & _MASK32, (low + (mid << 16)) & _MASK32


def philox4x32(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], key: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox-4x32-10 on int64 tensors holding 32-bit words: the four output words for each counter."""
    c0, c1, c2, c3 = counter
    key0, key1 = key
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_MUL_0, c0)
        hi1, lo1 = _mulhilo(PHILOX_MUL_1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ key0, lo1, hi0 ^ c3 ^ key1, lo0
        key0 = (key0 + PHILOX_KEY_BUMP_0) & _MASK32
        key1 = (key1 + PHILOX_KEY_BUMP_1) & _MASK32
    return c0, c1, c2, c3


def philox_first_word(seed: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """First output word for counters ``(cols, rows_lo, rows_hi, 0)`` under key ``seed``, as int64."""
    rows, cols = torch.broadcast_tensors(rows.to(torch.int64), cols.to(torch.int64))
    counter = (cols & _MASK32, rows & _MASK32, rows >> 32, torch.zeros_like(cols))
    return philox4x32(counter, split_seed(seed))[0]


def dropout_mask(
    seed: int, shape: Shape, p: float, device: Device = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The exact dropout mask the kernels apply to an input of ``shape`` for ``seed``.

    Returns a tensor of ``shape`` holding ``1 / (1 - p)`` where the element is kept and ``0`` where it is
    dropped, ready to pass as ``dropout_mask`` to :func:`lora_kernels.reference.lora_linear_reference`.
    The leading dims of ``shape`` are flattened into rows, as the kernels see ``x.reshape(-1, K)``.
    Uses the compiled extension's Philox when it is built (about 20× faster on CPU), else
    :func:`dropout_mask_torch`; both give the same bits (tested).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    shape = tuple(shape)
    if len(shape) == 0:
        raise ValueError("dropout_mask needs at least one dimension")
    device = torch.device(device or "cpu")
    from .ops import cuda_lora  # deferred: the extension is optional

    usable = cuda_lora.is_available() if device.type == "cuda" else device.type == "cpu"
    if not (usable and cuda_lora.has_extension()):
        return dropout_mask_torch(seed, shape, p, device, dtype)
    return torch.ops.lora_kernels.lora_dropout_mask(shape, p, seed, device=device).to(dtype)


def dropout_mask_torch(
    seed: int, shape: Shape, p: float, device: Device = None, dtype=torch.float32
) -> torch.Tensor:
    """:func:`dropout_mask` in plain torch ops: the executable specification of the scheme."""
    shape = tuple(shape)
    rows = torch.arange(math.prod(shape[:-1]), device=device, dtype=torch.int64).unsqueeze(1)
    cols = torch.arange(shape[-1], device=device, dtype=torch.int64).unsqueeze(0)
    word = philox_first_word(seed, rows, cols)
    keep = (word >> (32 - _THRESHOLD_BITS)) >= dropout_threshold(p)
    return (keep.to(dtype) * (1.0 / (1.0 - p))).reshape(shape)
