"""Command line: ``python -m lora_kernels check``."""

from __future__ import annotations

import argparse
import sys

from . import check
from .quant4bit import quiet_bitsandbytes_cpu_notice

#: Commands that moved out of the package into the repository (they are tooling, not part of an install).
MOVED = {
    "bench": "python benchmarks/report.py (in a clone of the repository)",
    "demo": "bash scripts/demo.sh, or python examples/finetune_demo.py (in a clone of the repository)",
}


def main(argv: list[str] | None = None) -> int:
    quiet_bitsandbytes_cpu_notice()  # a command line, not the library: its logging is ours to set
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in MOVED:
        print(f"`python -m lora_kernels {argv[0]}` moved: run {MOVED[argv[0]]}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog="python -m lora_kernels", description="Fused LoRA kernels for PyTorch."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{check}")
    sub.add_parser(
        "check", help="show the environment and run a quick parity self-test of every backend", add_help=False
    )
    _, rest = parser.parse_known_args(argv)
    return check.main(rest)


if __name__ == "__main__":
    sys.exit(main())
