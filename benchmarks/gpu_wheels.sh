#!/usr/bin/env bash
# The wheels benchmarks/gpu_suite.py needs on the GPU machine (Python 3.12, x86-64, torch 2.11,
# transformers, tokenizers, pyarrow, fsspec, pyyaml, ninja... already there; no pydantic, no
# DeepSpeed, no network), fetched or built here, checked to fit the 64 MiB a call may carry.
#
#   benchmarks/gpu_wheels.sh wheels
#   # there:  python3 -m pip install -q --no-deps --no-index wheels/*.whl
#   #         PYTHONPATH=. python3 benchmarks/gpu_suite.py --out "$OUT"
#
# DeepSpeed is built here as a pure-Python wheel (its CUDA ops compile there on first use, with
# nvcc and ninja); --no-build-isolation builds it against this venv's torch instead of letting pip
# fetch an unpinned (CUDA) torch.
set -euo pipefail
dir=${1:?usage: benchmarks/gpu_wheels.sh DIR}
py=${PYTHON:-.venv/bin/python}
limit=$((64 * 1024 * 1024))
mkdir -p "$dir"
"$py" -m pip download -q --no-deps --dest "$dir" --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --platform manylinux2014_x86_64 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation --wheel-dir "$dir" deepspeed==0.19.8
size=$(cat "$dir"/*.whl | wc -c)
echo "$dir: $(ls "$dir"/*.whl | wc -l) wheels, $size bytes"
if [ "$size" -gt "$limit" ]; then
  echo "gpu_wheels: $size bytes of wheels in $dir, more than the 64 MiB a device call carries" >&2
  exit 1
fi
