#!/usr/bin/env bash
# The GPU check of `tiecheck bench`: the one script to run on a machine with a CUDA GPU.
#
#   benchmarks/gpu_check.sh [OUTDIR]        # OUTDIR defaults to benchmarks/results
#
# Runs, on the first GPU:
#   1. the default bench (gpt2-124m, train, bf16 autocast where the GPU has it, batch 16 x 1024);
#   2. gpt2-124m training with bf16 and torch.compile, plus --find-max-batch (the largest batch
#      each variant fits alone, and its throughput there).
# Each writes a table with its header (device, dtype, torch version, exact command) to
# OUTDIR/bench-<run>-<gpu>.txt and a plot next to it. The targets to read off them: MFU >= 40%
# for run 2, and a tied/untied step-time interval narrower than +-1%.
#
# It runs this checkout without installing it (a GPU image often has torch but no network for
# pip): the package and the bundled models are copied into a temporary folder on PYTHONPATH.
# Needs python3 with a CUDA torch, click, pandas, tabulate and numpy; matplotlib for the plots.
# Budget: about 1 minute for run 1 and 3 to 6 for run 2 (compilation included); each run has
# its own time limit so that one stuck run cannot eat the other's time.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
mkdir -p "$out"
py="${PYTHON:-python3}"

shim="$(mktemp -d)"
trap 'rm -rf "$shim"' EXIT
cp -r tiecheck "$shim/" && cp -r models "$shim/tiecheck/models"
find "$shim" -name __pycache__ -prune -exec rm -rf {} +
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

gpu="$("$py" -c 'import re, torch; assert torch.cuda.is_available(); print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-"))' 2>/dev/null)" \
    || { echo "gpu_check: no CUDA GPU visible to $py; nothing run" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

plot=()
"$py" -c 'import matplotlib' 2>/dev/null && plot=(--plot)

status=0
bench() {  # NAME LIMIT_SECONDS OPTIONS...
    local name=$1 limit=$2; shift 2
    local table="$out/bench-$name-$gpu.txt"
    echo "== tiecheck bench $* (limit ${limit}s) -> $table"
    local t0=$SECONDS rc=0
    timeout "$limit" "$py" -m tiecheck.cli bench "$@" -o "$table" ${plot:+"${plot[@]}" "$out/bench-$name-$gpu.png"} || rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ -f "$table" ] && cat "$table"
    [ "$rc" -eq 0 ] || status=1
}

bench default 150
bench gpt2-124m-train-bf16-compile-maxbatch 420 --model gpt2-124m --mode train --find-max-batch --dtype bf16 --compile
exit "$status"
