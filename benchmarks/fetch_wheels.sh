#!/usr/bin/env bash
# The wheels a GPU visit carries to the device machine, which reaches no package registry:
#
#   bash benchmarks/fetch_wheels.sh      # here, where pip reaches PyPI: into .whl/ at the repository root
#
# .whl/ is ignored by git (/.whl/ in .gitignore); each `run` call names it in `carry`, and gpu_run.sh
# installs what it holds into /tmp/site at the start of each call (benchmarks/README.md).
#
# bitsandbytes 0.50.2 (about 41 MiB; the qlora phase, the QLoRA tests): it requires torch>=2.4,<3,
# numpy>=1.17 and packaging>=20.9 (`unzip -p .whl/bitsandbytes-*.whl '*/METADATA' | grep ^Requires-Dist`,
# extras left out), which the GPU machine has (torch 2.11.0, numpy 2.5.2, packaging), hence --no-deps; it
# holds libbitsandbytes_cuda130.so for that machine's CUDA 13.0. The download line is the device README's,
# with manylinux_2_24 added: the tag this wheel has, which pip matches exactly.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BITSANDBYTES=0.50.2
mkdir -p .whl
# one version of each package: two stop the whole install there
find .whl -name 'bitsandbytes-*.whl' ! -name "bitsandbytes-$BITSANDBYTES-*" -delete
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "bitsandbytes==$BITSANDBYTES"
ls -la .whl
du -sh .whl
