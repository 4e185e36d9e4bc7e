"""Backend implementations of the fused LoRA linear.

Every backend module exposes the same two functions on 2-D tensors, called by the autograd Function in
:mod:`lora_kernels.functional`:

``lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> (y, t)``
    ``x`` is ``(M, K)`` with any strides; ``y`` is ``(M, N)`` in ``x.dtype``; ``t = s·dropout(x)·Aᵀ`` is the
    ``(M, r)`` float32 intermediate kept for backward.

``lora_backward(grad_y, x, weight, lora_A, lora_B, t, scaling, dropout_p, seed, needs_grad)
-> (grad_x, grad_weight, grad_bias, grad_A, grad_B)``
    ``needs_grad`` is five booleans in that order; a gradient not needed is ``None``.

Precision contract (the same in every backend): the matmuls run in the input's dtype (adapters are cast
tile by tile, never x), accumulate in float32, and ``t`` stays float32; ``y`` and ``grad_x`` come out in
``x.dtype``, ``grad_A``/``grad_B`` in the adapters' dtype, as under ``torch.autocast``.
"""
