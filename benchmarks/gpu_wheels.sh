#!/usr/bin/env bash
# The Python packages graftfl needs that a lent GPU machine's image lacks, as cp312 wheels in .whl/
# (ignored by git), for benchmarks/gpu_session.sh to install there: nothing can be fetched on that machine.
#
#   bash benchmarks/gpu_wheels.sh            # here, once: about 30 MB
#
# Versions are this checkout's venv's (`pip freeze`), so the device runs what the tests here ran. The
# image already holds torch, numpy, grpcio, protobuf, matplotlib, scikit-learn/-image, pillow, httpx,
# psutil and the rest (../.library/device/KINDS.md); carrying another torch would not fit in a call.
# Ray is left out (its wheel alone is over the 64 MiB a call carries): the in-process backend needs none.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NEEDED="alembic annotated-types antlr4-python3-runtime cffi cryptography datasets dill fastapi fire flwr flwr-datasets greenlet
grpcio-health-checking httptools hydra-core imagehash iterators jsonschema jsonschema-specifications mako medmnist
multiprocess omegaconf opacus openmined-psi prompt-toolkit pycparser pycryptodome pydantic pydantic-core python-dotenv
pywavelets referencing rpds-py sqlalchemy starlette termcolor tomli tomli-w typing-inspection tzdata uvicorn watchfiles
wcwidth websockets"
# name==version for each needed package, as installed here (names compared lower-case, '_' as '-')
pins=$("$PY" -m pip freeze | awk -F'==' -v needed=" $(echo $NEEDED) " \
  '{name = tolower($1); gsub("_", "-", name); if (index(needed, " " name " ")) print $0}')
found=$(echo "$pins" | awk -F'==' '{name = tolower($1); gsub("_", "-", name); print name}')
missing=$(for name in $NEEDED; do echo "$found" | grep -qx "$name" || echo "$name"; done)
[ -z "$missing" ] || { echo "not installed in $PY's venv (make install first): $(echo $missing)" >&2; exit 1; }
wheel_pins=$(echo "$pins" | grep -iv '^antlr4')
platforms=""
for glibc in 17 24 27 28 31 34 35; do platforms="$platforms --platform manylinux_2_${glibc}_x86_64"; done
rm -rf .whl  # one version of each package: two would stop the install on the device
mkdir -p .whl
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $platforms --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $wheel_pins
# hydra-core's parser runtime is published as a source archive only: build its (pure Python) wheel here
antlr=$(echo "$pins" | grep -i '^antlr4')
"$PY" -m pip wheel -q --no-deps -w .whl "$antlr"
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
