"""``python -m lora_kernels check``: the environment, the backends, the path ``auto`` takes for typical
calls and why, and a parity self-test of each backend."""

from __future__ import annotations

import argparse
import platform

import torch

from .dispatch import BACKENDS, available_backends, select_backend, use_backend
from .dropout import dropout_mask
from .functional import dora_linear, lora_linear
from .ops.routing import explain_path, offered_paths, use_path
from .reference import dora_linear_reference, dora_weight_norm_reference, lora_linear_reference
from .testing import assert_close, relative_error

#: Gradients reduce over more terms than the output: twice the output's tolerance (as in the tests).
GRAD_SLACK = 2.0


def parity(
    backend: str, device: torch.device, dtype: torch.dtype, dora: bool = False
) -> dict[str, tuple[float, bool]]:
    """``{name: (relative error, within tolerance)}`` of y, dx, dA, dB (and DoRA's dm) against the float64
    reference (dropout on, odd shapes), judged by :func:`lora_kernels.testing.assert_close`."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(device, dtype)

    x, weight, bias = rand(3, 37, 70).requires_grad_(), rand(45, 70, std=0.12), rand(45)
    lora_A, lora_B = rand(5, 70, std=0.12).requires_grad_(), rand(45, 5, std=0.45).requires_grad_()
    grad_y = rand(3, 37, 45)
    trained = [x, lora_A, lora_B]
    if dora:  # a magnitude off the norm by a few percent per row
        norm = dora_weight_norm_reference(weight, lora_A, lora_B, 2.0)
        trained.append(
            (norm * (1 + 0.1 * torch.rand(45, generator=gen, dtype=torch.float64))).to(device, dtype)
        )
        trained[-1].requires_grad_()
    with use_backend(backend):
        if dora:
            y = dora_linear(x, weight, bias, lora_A, lora_B, trained[3], 2.0, 0.1, True, dropout_seed=11)
        else:
            y = lora_linear(x, weight, bias, lora_A, lora_B, 2.0, 0.1, training=True, dropout_seed=11)
        grads = torch.autograd.grad(y, trained, grad_y)
    leaves = [t.detach().double().requires_grad_() for t in trained]
    mask = dropout_mask(11, x.shape, 0.1, device=device)
    if dora:
        y_ref = dora_linear_reference(leaves[0], weight, bias, leaves[1], leaves[2], leaves[3], 2.0, mask)
    else:
        y_ref = lora_linear_reference(leaves[0], weight, bias, leaves[1], leaves[2], 2.0, mask, upcast=True)
    grads_ref = torch.autograd.grad(y_ref, leaves, grad_y.double())
    results = {}
    names = ("y", "dx", "dA", "dB", "dm")[: len(trained) + 1]
    for name, got, ref in zip(names, (y, *grads), (y_ref, *grads_ref), strict=True):
        try:
            assert_close(got, ref, dtype, name, 1.0 if name == "y" else GRAD_SLACK)
            ok = True
        except AssertionError:
            ok = False
        results[name] = (relative_error(got, ref), ok)
    return results


def print_routing(device: torch.device, shape: tuple[int, int] = (4096, 4096), r: int = 16) -> None:
    """The path ``auto`` takes for a ``shape`` (in, out) layer at a few batch sizes, and why."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:  # a backend or path forced by the environment that cannot run here: say so, go on
        backend = select_backend(device, dtype, r)
        explain_path(backend, device, dtype, dtype, False, 16, 16, 16, r, False)
    except (RuntimeError, ValueError) as err:
        print(f"routing: {err}")
        return
    K, N = shape
    if len(offered_paths(backend, device)) == 1:
        print(f"routing: path {offered_paths(backend, device)[0]}, the only one of the {backend} backend")
        return
    print(f"routing ({dtype}, {K}x{N}, r = {r}; backend {backend}):")
    for training in (False, True):
        for dropout in (False, True):
            for M in (16, 512, 8192):
                path, why = explain_path(backend, device, dtype, dtype, dropout, M, N, K, r, training)
                case = f"{'fwd+bwd' if training else 'fwd'} p{'>0' if dropout else '=0'} M={M}"
                print(f"  {case:20s} {path:6s} {why}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_kernels check", description=__doc__)
    parser.parse_args(argv)
    print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    usable = available_backends(device)
    print(f"backends: {', '.join(usable)} (of {', '.join(BACKENDS)})")
    print_routing(device)
    failed = False
    for backend in usable:
        paths = offered_paths(backend, device)
        for path, dora in [*((p, False) for p in paths), ("auto", True)]:  # DoRA is not routed
            for dtype in (torch.float32, torch.float16):
                with use_path(path):
                    results = parity(backend, device, dtype, dora)
                ok = all(within for _, within in results.values())
                failed |= not ok
                shown = ", ".join(f"{k} {err:.1e}" for k, (err, _) in results.items())
                what = f"{backend} {'DoRA' if dora else 'LoRA'}" + (
                    f" {path}" if len(paths) > 1 and not dora else ""
                )
                print(f"  {what:17s} {dtype!s:14s} {'ok  ' if ok else 'FAIL'} max rel. error: {shown}")
    return 1 if failed else 0
