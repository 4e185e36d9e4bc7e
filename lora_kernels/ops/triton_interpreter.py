"""Fixes for known bugs of Triton's CPU interpreter (``TRITON_INTERPRET=1``) in the triton releases we support.

:func:`fix_interpreter` runs once, at the first kernel launch under the interpreter (the launch support
calls it); nothing here touches a compiled launch on a GPU.

triton < 3.8, numpy >= 2.4: the interpreter turns a scalar tensor into a Python int (a loop bound:
``range(0, tl.cdiv(K, BLOCK_K))``, ``range(0, K, BLOCK_K)``, ``tl.range(pid, tiles, NUM_SMS)``) with
``int()`` on a one-element numpy array. numpy 2.4 raises ``TypeError: only 0-dimensional arrays can be
converted to Python scalars``; numpy 1.25 to 2.3 warn ``DeprecationWarning``. No loop form avoids it (every
kernel argument is such an array there), so without this every kernel with a loop fails on triton 3.6 with a
current numpy. triton 3.8 squeezes the array first (``interpreter._patch_lang_tensor``); so does the fix,
for the releases before it.
"""

from __future__ import annotations

import threading

import triton

TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])

_lock = threading.Lock()
_fixed = False


def _tensor_index(self) -> int:
    """``tl.tensor.__index__`` as triton 3.8's interpreter has it: a one-element array squeezed first."""
    return int(self.handle.data.squeeze())


def fix_interpreter() -> None:
    """Apply the fixes this triton's interpreter needs (idempotent; a no-op from triton 3.8 on)."""
    global _fixed
    if _fixed:
        return
    with _lock:
        if _fixed:
            return
        if TRITON_VERSION < (3, 8):
            from triton.runtime import interpreter

            patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
            if patch_tensor is not None:

                def patch_lang_tensor(tensor, scope) -> None:
                    patch_tensor(tensor, scope)
                    # through the scope, so that the interpreter restores the original after the kernel
                    scope.set_attr(tensor, "__index__", _tensor_index)

                interpreter._patch_lang_tensor = patch_lang_tensor
        _fixed = True
