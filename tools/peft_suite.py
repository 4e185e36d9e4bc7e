"""Run PEFT's own LoRA tests twice, with and without ``lora_kernels.peft.fuse``, and compare.

    python tools/peft_suite.py --tests build/peft_tests/tests/test_custom_models.py [more files] \
        --sample 1 --out benchmarks/results/cpu/peft_suite.md

PEFT's tests are not in its wheel: export them from a clone of its repository first,

    python tools/peft_suite.py --export /path/to/peft/.git [--commit REV]

(``git archive REV tests`` into ``build/peft_tests``; REV defaults to the tag ``v<installed version>``,
else the clone's HEAD; ``build/peft_tests/SOURCE`` records which, and the summary quotes it). They need
``diffusers``, ``datasets``, ``parameterized`` and ``scipy``. The fused run gives every PEFT ``lora.Linear``
the fused forward when it is built (``tools/peft_suite_plugin.py``) and counts how each call ran. A test
that fails only in the fused run is ours to look at.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(tests: list[Path], fuse: bool, sample: int, keyword: str, out: Path) -> tuple[dict, float]:
    env = dict(os.environ, LK_PEFT_SUITE_FUSE="1" if fuse else "0", LK_PEFT_SUITE_SAMPLE=str(sample),
               LK_PEFT_SUITE_OUT=str(out), PYTHONPATH=f"{ROOT / 'tools'}:{os.environ.get('PYTHONPATH', '')}")  # fmt: skip
    env.pop("TRITON_INTERPRET", None)  # the CPU path a user gets: the torch backend
    cmd = [sys.executable, "-m", "pytest", *map(str, tests), "-q", "-p", "peft_suite_plugin", "-p", "no:cacheprovider",
           "-k", keyword, "-W", "ignore"]  # fmt: skip
    start = time.time()
    subprocess.run(cmd, cwd=tests[0].parents[1], env=env, stdout=subprocess.DEVNULL, check=False)
    return json.loads(out.read_text()), time.time() - start


def export(git_dir: Path, commit: str | None, dest: Path) -> str:
    """PEFT's ``tests`` at ``commit`` (default: the installed version's tag, else HEAD) into ``dest``."""
    import peft

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(git_dir), *args], capture_output=True, text=True
        ).stdout.strip()

    tag = f"v{peft.__version__}"
    rev = commit or (tag if git("rev-parse", "-q", "--verify", f"refs/tags/{tag}") else "HEAD")
    sha = git("rev-parse", "--short=9", rev)
    if not sha:
        raise SystemExit(f"{rev!r} is not a commit of {git_dir}")
    version = next(
        (line.split("=")[1].strip().strip('"') for line in git("show", f"{sha}:setup.py").splitlines()
         if line.startswith("VERSION")), "?",
    )  # fmt: skip
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(git_dir), "archive", sha, "tests"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    source = (
        f"huggingface/peft at commit {sha} ({git('show', '-s', '--format=%cs', sha)}; its setup.py says "
        f"{version}; {'the tag ' + tag if rev == tag else rev + ', no tag ' + tag + ' in that clone'}), "
        f"exported with `git archive {sha} tests`"
    )
    (dest / "SOURCE").write_text(source + "\n")
    return source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, metavar="GIT_DIR", help="export PEFT's tests from this clone")
    parser.add_argument("--commit", help="with --export: the commit to take (default: see above)")
    parser.add_argument(
        "--tests", type=Path, nargs="+", default=[ROOT / "build/peft_tests/tests/test_custom_models.py"]
    )
    parser.add_argument("--sample", type=int, default=5, help="keep every N-th collected test")
    parser.add_argument("-k", dest="keyword", default="lora or Lora or LoRA")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cpu/peft_suite.md")
    args = parser.parse_args()
    if args.export:
        print(export(args.export, args.commit, ROOT / "build/peft_tests"))
        return 0
    args.tests = [t.resolve() for t in args.tests]
    source_file = args.tests[0].parents[1] / "SOURCE"
    source = source_file.read_text().strip() if source_file.exists() else "from PEFT's repository"
    plain, plain_s = run(args.tests, False, args.sample, args.keyword, ROOT / "build/peft_suite_plain.json")
    fused, fused_s = run(args.tests, True, args.sample, args.keyword, ROOT / "build/peft_suite_fused.json")
    import peft
    import torch
    import transformers

    def count(result, outcome):
        return sum(1 for o in result["outcomes"].values() if o == outcome)

    ours = sorted(
        t for t, o in fused["outcomes"].items() if o == "failed" and plain["outcomes"].get(t) == "passed"
    )
    lines = [
        "# PEFT's own LoRA tests through lora_kernels.peft's fused forward",
        "",
        f"{time.strftime('%Y-%m-%d')}, `python tools/peft_suite.py --sample {args.sample}`: "
        f"{', '.join(f'`{t.name}`' for t in args.tests)} "
        f'`-k "{args.keyword}"`, every {args.sample}-th collected test, run against the installed peft; '
        "CPU, torch backend.",
        f"PEFT's tests: {source}.",
        f"Versions: peft {peft.__version__}, torch {torch.__version__}, transformers {transformers.__version__}.",
        "",
        "| run | passed | failed | skipped | seconds |",
        "| --- | --- | --- | --- | --- |",
        f"| PEFT alone | {count(plain, 'passed')} | {count(plain, 'failed')} | {count(plain, 'skipped')} | {plain_s:.0f} |",
        f"| every lora.Linear fused | {count(fused, 'passed')} | {count(fused, 'failed')} | {count(fused, 'skipped')} | {fused_s:.0f} |",
        "",
        f"Failing only when fused: {len(ours)}" + ("" if not ours else ":"),
        *[f"- `{t}`" for t in ours],
        "",
        "How the fused run's `lora.Linear` calls ran:",
        "",
        "| calls | how |",
        "| --- | --- |",
        *[f"| {n} | {how} |" for how, n in fused["calls"].items()],
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if count(plain, "passed") and count(fused, "passed") else 1  # nothing ran: a broken set-up


if __name__ == "__main__":
    raise SystemExit(main())
