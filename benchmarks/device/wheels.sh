#!/usr/bin/env bash
# Run HERE (pip reaches PyPI here, not there) before a device call: fills .whl/ (git-ignored) with the wheels
# that the device image lacks, for its Python 3.12. check.sh installs them there; the call names .whl in carry.
# The image's package list: ../.library/device/KINDS.md ("Python packages already there").
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir .whl
# enigma's own needs the image lacks (torch, triton, numpy, transformers, pytest, hypothesis... are there),
# setuptools>=77 to build enigma's distributions, and exllamav2 (#23's oracle; it compiles its CUDA
# extension there on first import)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl stevedore starlette hypercorn h2 hpack hyperframe priority wsproto cattrs platformdirs tomli-w \
    gguf websockets "setuptools>=77" exllamav2==0.3.2
du -sh .whl
