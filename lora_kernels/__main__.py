"""Command line: ``python -m lora_kernels {demo,check,bench}``."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": (
        "lora_kernels.demo",
        "fine-tune a small model with fused LoRA adapters on the best backend here",
    ),
    "check": ("lora_kernels.check", "show the environment and run a quick parity self-test of every backend"),
    "bench": (
        "lora_kernels.bench",
        "benchmark against nn.Linear, PEFT and the unfused composite; write a report",
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lora_kernels", description="Fused LoRA kernels for PyTorch."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
