"""The dropout mask of the LoRA branch: one counter-based RNG shared by every backend.

Every backend (Triton kernels, the CUDA extension, the torch composite) draws the LoRA-branch dropout mask
from the same function of ``(seed, row, column)``, so the backward pass can regenerate it (the GPU kernels
do, inside their tiles; the torch backend on the CPU keeps it packed at one bit per element instead, one
byte per Philox call, :func:`lora_kernels.ops.with_kept_mask`), and tests reproduce it exactly with
:func:`dropout_mask`.

The scheme, for ``x`` viewed as a 2-D ``(M, K)`` matrix (leading dims flattened, row-major). One Philox
call gives eight mask elements, the eight columns ``8g .. 8g + 7`` of a row:

* Philox-4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
  key ``(seed & 0xFFFFFFFF, seed >> 32)``, counter ``(col // 8, row & 0xFFFFFFFF, row >> 32, 0)``;
* its four 32-bit output words ``w0, w1, w2, w3`` are cut into eight 16-bit values: element ``col`` takes
  ``j = col % 8``, word ``w[j // 2]``, its low half (bits 0-15) for even ``j`` and its high half
  (bits 16-31) for odd ``j``, i.e. in column order ``w0.lo, w0.hi, w1.lo, w1.hi, w2.lo, w2.hi, w3.lo,
  w3.hi``;
* the element is kept when that value ``v`` satisfies ``v >= T`` with ``T = round(p * 2**16)`` (Python's
  round, half to even): :func:`dropout_threshold`;
* kept elements are scaled by ``1 / (1 - p)``, dropped ones are zero (inverted dropout, as ``nn.Dropout``).

What the 16-bit threshold means for ``p``: the probability that an element is dropped is exactly
``T / 2**16``, ``p`` rounded to a multiple of ``2**-16`` (:func:`quantized_dropout_p`): ``p = 0.1`` drops
with probability ``6554 / 65536 = 0.10000610...``, ``p = 0.5`` exactly ``0.5``; any ``p < 2**-17`` drops
nothing. The rounding error is at most ``2**-17 = 7.6e-6``.

The scale uses the caller's ``p``, not the quantised one: the mask's values are those of ``nn.Dropout(p)``
(``1 / (1 - p)``, which users and PEFT comparisons expect), the scale stays finite when ``p`` rounds to 1,
and the mask's expectation, ``(1 - T / 2**16) / (1 - p)``, differs from 1 by at most
``2**-17 / (1 - p)`` (``6.8e-6`` at ``p = 0.1``), about 300 times below bfloat16's rounding (``2**-9``)
and far below the sampling noise of any dropout mask. Every backend computes the scale this way.

Where the seed comes from. A call without an explicit seed draws one *on the input's device* from that
device's torch generator (:func:`draw_seed`: one ``torch.randint`` there): on CUDA that draw is Philox of the
generator's ``(seed, offset)``, the state torch's own dropout uses, so ``torch.manual_seed`` fixes it and a
CUDA graph capture registers it and advances the offset on each replay. The seed stays an int64 tensor on
the device from then on: the kernels read it through its pointer, never as a number baked into a launch,
a CUDA graph or a compiled graph. The Philox offset therefore enters only through that one draw; the mask
of a call is ``dropout_mask(seed, ...)`` of the seed the call drew (or was given), a pure function of it.

Why 8 elements per call: Philox-4x32-10 costs about 47 instructions (25 of them integer multiplies); one
call per element made the mask cost more than reading ``x`` on a GPU. 16 bits per element is enough for a
dropout rate, and ``col // 8`` keeps each group inside one row, so a kernel whose column tiles start at
multiples of 8 evaluates one call per 8 columns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Shape = Sequence[int] | torch.Size
Device = torch.device | str | None
#: A dropout seed: an int in ``[0, 2**63)`` or an int64 tensor of one element holding one.
Seed = int | torch.Tensor

PHILOX_ROUNDS = 10
PHILOX_MUL_0 = 0xD2511F53
PHILOX_MUL_1 = 0xCD9E8D57
PHILOX_KEY_BUMP_0 = 0x9E3779B9
PHILOX_KEY_BUMP_1 = 0xBB67AE85
#: Mask elements per Philox call: the 4 output words give 8 values of VALUE_BITS bits each.
ELEMENTS_PER_CALL = 8
VALUE_BITS = 16
_MASK32 = 0xFFFFFFFF
_VALUE_MASK = (1 << VALUE_BITS) - 1


def dropout_threshold(p: float) -> int:
    """``round(p * 2**16)``: an element whose 16-bit value is below it is dropped (0 .. 65536)."""
    return round(p * (1 << VALUE_BITS))


def quantized_dropout_p(p: float) -> float:
    """The drop probability the mask really has for ``p``: ``p`` rounded to a multiple of ``2**-16``."""
    return dropout_threshold(p) / (1 << VALUE_BITS)


def split_seed(seed: Seed) -> tuple:
    """Split a 63-bit seed into the two 32-bit Philox key words (low, high): ints for an int, int64 0-d
    tensors for a tensor (read on its device, never on the host)."""
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(()).to(torch.int64)
        return seed & _MASK32, (seed >> 32) & _MASK32
    if not 0 <= seed < 2**63:
        raise ValueError(f"dropout seed must be in [0, 2**63), got {seed}")
    return seed & _MASK32, (seed >> 32) & _MASK32


def check_seed_value(seed: torch.Tensor) -> None:
    """A ``ValueError`` for a seed tensor holding a negative value, where reading it costs no host sync: on
    the CPU (eager). A negative int is refused as early (:func:`split_seed`), so every backend refuses a
    negative seed the same way before any kernel runs. On a GPU the value is not read (that would stall the
    host): the kernels and :func:`dropout_mask` all take its 64 bits as they are, so they still agree."""
    if seed.device.type == "cpu" and not torch.compiler.is_compiling():
        value = int(seed.reshape(()))
        if value < 0:
            raise ValueError(f"dropout seed must be in [0, 2**63), got a tensor holding {value}")


def draw_seed(device: Device = None) -> torch.Tensor:
    """A fresh 63-bit seed, an int64 0-d tensor drawn on ``device`` from that device's torch generator.

    No host round trip: on CUDA it is one ``torch.randint`` kernel, Philox of the generator's ``(seed,
    offset)``, which CUDA-graph capture registers (each replay draws anew) and ``torch.compile`` traces.
    """
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=device)


def seed_tensor(seed: Seed, device: Device = None) -> torch.Tensor:
    """``seed`` as the int64 0-d tensor on ``device`` that the kernels read.

    An int becomes a ``torch.full`` on the device (its value is a kernel argument, which a CUDA graph keeps,
    as a user's fixed seed asks); a tensor is reshaped and moved only if it is elsewhere.
    """
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"a dropout seed tensor must be int64 with one element, got {seed.dtype} "
                             f"{tuple(seed.shape)}")  # fmt: skip
        if seed.dim() == 0 and (device is None or seed.device == device):  # as draw_seed made it
            return seed
        seed = seed.reshape(())
        return seed if device is None or seed.device == torch.device(device) else seed.to(device)
    return torch.full((), seed, dtype=torch.int64, device=device)


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


def philox_group_values(seed: Seed, rows: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The eight 16-bit values of the column groups ``groups`` (``col // 8``) of ``rows``, as int64.

    ``rows`` and ``groups`` broadcast to a shape ``S``; the result has shape ``(*S, 8)``, its last index
    ``j`` being ``col % 8``: one Philox call per entry of ``S``, counter ``(group, row_lo, row_hi, 0)``.
    """
    rows, groups = torch.broadcast_tensors(rows.to(torch.int64), groups.to(torch.int64))
    counter = (groups & _MASK32, rows & _MASK32, rows >> 32, torch.zeros_like(groups))
    words = philox4x32(counter, split_seed(seed))
    halves = [(word >> shift) & _VALUE_MASK for word in words for shift in (0, VALUE_BITS)]
    return torch.stack(halves, dim=-1)  # j = 2 * word + half


def dropout_values(seed: Seed, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The 16-bit value of each element ``(rows, cols)`` (broadcast), compared with the threshold.

    Element by element (one Philox call each): for tests and small lookups. :func:`dropout_mask_torch`
    evaluates each call once for its eight columns.
    """
    rows, cols = torch.broadcast_tensors(rows.to(torch.int64), cols.to(torch.int64))
    values = philox_group_values(seed, rows, cols // ELEMENTS_PER_CALL)
    return values.gather(-1, (cols % ELEMENTS_PER_CALL).unsqueeze(-1)).squeeze(-1)


def dropout_mask(
    seed: Seed, shape: Shape, p: float, device: Device = None, dtype: torch.dtype = torch.float32,
    column_offset: int = 0,
) -> torch.Tensor:  # fmt: skip
    """The exact dropout mask the kernels apply to an input of ``shape`` for ``seed``.

    Returns a tensor of ``shape`` holding ``1 / (1 - p)`` where the element is kept and ``0`` where it is
    dropped, ready to pass as ``dropout_mask`` to :func:`lora_kernels.reference.lora_linear_reference`.
    The leading dims of ``shape`` are flattened into rows, as the kernels see ``x.reshape(-1, K)``.
    ``seed`` is an int or an int64 tensor (e.g. the seed a call drew; read on the device, no sync).
    Uses the compiled extension's Philox when it is loaded (30–50× faster on a 2-core CPU), else
    :func:`dropout_mask_torch`; both give the same bits (tested). Under ``torch.compile`` it is
    :func:`dropout_mask_torch`, which the compiler fuses.

    ``column_offset``: the mask of the columns ``column_offset + [0, shape[-1])`` of a wider input, that of
    a shard of the input dimension (a row-parallel layer): the columns ``[o, o + K)`` of the mask of
    ``(..., o + K)``. The extension makes the mask from column 0, so it makes the wider one and cuts it.
    """
    if column_offset:
        if column_offset < 0:
            raise ValueError(f"column_offset must be >= 0, got {column_offset}")
        wide = (*tuple(shape)[:-1], column_offset + tuple(shape)[-1])
        return dropout_mask(seed, wide, p, device, dtype)[..., column_offset:].contiguous()
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    shape = tuple(shape)
    if len(shape) == 0:
        raise ValueError("dropout_mask needs at least one dimension")
    device = torch.device(device or "cpu")
    if isinstance(seed, torch.Tensor):
        check_seed_value(seed)
    if torch.compiler.is_compiling():  # one opaque op in the graph (see _mask_op)
        return _mask_op(seed_tensor(seed, device), list(shape), float(p), dtype)
    if not extension_has("lora_dropout_mask", device):
        return dropout_mask_torch(seed, shape, p, device, dtype)
    return torch.ops.lora_kernels.lora_dropout_mask(shape, p, seed_tensor(seed, device)).to(dtype)


@torch.library.custom_op("lora_kernels::dropout_mask", mutates_args=(), device_types=None)
def _mask_op(seed: torch.Tensor, shape: list[int], p: float, dtype: torch.dtype) -> torch.Tensor:
    """:func:`dropout_mask` as one op for compiled graphs (DoRA's composite under ``torch.compile``): the
    compiler sees its shape only, not some 200 int64 ops of Philox, whose inlined expressions took
    inductor minutes to compile; the mask is made by the extension where it is loaded."""
    return dropout_mask(seed, shape, p, device=seed.device, dtype=dtype)


@_mask_op.register_fake
def _(seed, shape, p, dtype):
    return seed.new_empty(shape, dtype=dtype)


# (op, device type) pairs the extension has a kernel for: a kernel, once registered, stays (the dispatcher
# query costs about 3 µs, once per call with dropout otherwise). Absences are asked again: the extension may
# be loaded later.
_EXTENSION_KERNELS: set[tuple[str, str]] = set()


def extension_has(op: str, device: torch.device) -> bool:
    """Whether the compiled extension (``lora_kernels._C``, optional) is loaded and has a kernel of ``op``
    for ``device``. Asks the dispatcher: this module imports no backend."""
    if (op, device.type) in _EXTENSION_KERNELS:
        return True
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    try:
        found = key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_kernels::{op}", key)
    except RuntimeError:  # the op is not registered: the extension is not loaded
        return False
    if found:
        _EXTENSION_KERNELS.add((op, device.type))
    return found


def dropout_mask_torch(
    seed: Seed, shape: Shape, p: float, device: Device = None, dtype=torch.float32
) -> torch.Tensor:
    """:func:`dropout_mask` in plain torch ops: the executable specification of the scheme.

    One Philox call per group of 8 columns of each row (the last group of a row may reach past ``K``:
    its extra values are cut off).
    """
    shape = tuple(shape)
    if isinstance(seed, torch.Tensor):
        seed = seed_tensor(seed, device)
    rows, cols = math.prod(shape[:-1]), shape[-1]
    groups = -(-cols // ELEMENTS_PER_CALL)
    row_ids = torch.arange(rows, device=device, dtype=torch.int64).unsqueeze(1)
    group_ids = torch.arange(groups, device=device, dtype=torch.int64).unsqueeze(0)
    values = philox_group_values(seed, row_ids, group_ids)  # (rows, groups, 8)
    values = values.reshape(rows, groups * ELEMENTS_PER_CALL)[:, :cols]
    keep = values >= dropout_threshold(p)
    return (keep.to(dtype) * (1.0 / (1.0 - p))).reshape(shape)
