#!/usr/bin/env bash
# The GPU check of `tiecheck bench`: the one script to run on a machine with a CUDA GPU.
#
#   benchmarks/gpu_check.sh [OUTDIR]            # OUTDIR defaults to benchmarks/results of this checkout
#   benchmarks/gpu_check.sh --dry-run [OUTDIR]  # the whole path on the CPU, tiny: OUTDIR defaults to a new temp folder
#
# Runs, on the current GPU:
#   1. the default bench (gpt2-124m with its vocabulary padded to 50,304, train, bf16 autocast
#      where the GPU has it, batch 16 x 1024);
#   2. the same with torch.compile, plus --find-max-batch (the largest batch each variant fits
#      alone, and its throughput there);
#   3. --mode converge at its GPU defaults (gpt2-124m, 3 seeds x 1,000 steps of 16 x 256 tokens, bf16
#      autocast, one host sync per validation pass), its budget printed before it trains;
#   4. FSDP2 on one rank (--nproc-per-node 1 --strategy fsdp2, MixedPrecisionPolicy in bf16): the one-GPU
#      FSDP2 code path, and the GPU's per-rank peak memory (no bytes cross on one rank).
# Everything goes under OUTDIR, at most 9 files: gpu_check.log (all console output, written as
# it happens, so a run cut short keeps it), and per run a table with its header (device,
# dtype, torch version, exact command, the datasheet peak MFU is against and a measured matmul
# beside it) in bench-<run>-<gpu>.txt, plus a plot for runs 1-3 when matplotlib is installed. Run 2
# writes its table before the max-batch search starts and after each variant, so a time limit
# still leaves the interleaved result. The targets to read off them: MFU >= 40% for run 2, and a
# tied/untied step-time interval narrower than +-1%.
#
# --dry-run runs the same path -- preflight, the four runs, their limits, the log and the tables --
# on the CPU with tiny sizes (gpt-mini, batch 2 x 8, 2 rounds; converge --quick for 4 steps), without
# the GPU-only options (--compile takes minutes on a CPU, --find-max-batch needs device memory): a
# check that the script and this checkout work together before a GPU slot is spent on them.
#
# It runs this checkout without installing it (a GPU image often has torch but no network for
# pip): PYTHONPATH is the checkout, PYTHONSAFEPATH=1 and a working directory outside the
# source tree keep the interpreter from putting the current folder first on sys.path, and
# tiecheck finds its models/ next to the package. Needs python3 (PYTHON=... to choose) with a
# CUDA torch (2.4 or later; GPU images ship 2.11), click, pandas, tabulate, numpy and tokenizers
# (which transformers brings); matplotlib for the plots; not fvcore.
# Exit: 0 every run passed, 1 a run failed or ran out of time, 2 no CUDA GPU (nothing run).
set -uo pipefail

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
# Time limits in seconds, each enforced (a step that ignores its SIGTERM is killed 5-10 s later):
# 590 s (9 min 50 s) in all at most, inside a 10-minute GPU slot: the six steps, their kill grace
# (5 + 5 + 4 x 10 s) and 10 s each for the two probes (nvidia-smi, matplotlib).
LIMIT_DETECT=30 LIMIT_PREFLIGHT=45 LIMIT_DEFAULT=70 LIMIT_COMPILE=180 LIMIT_CONVERGE=150 LIMIT_FSDP2=45 LIMIT_PROBE=10
GRACE=50
total=$((LIMIT_DETECT + LIMIT_PREFLIGHT + LIMIT_DEFAULT + LIMIT_COMPILE + LIMIT_CONVERGE + LIMIT_FSDP2 + GRACE
         + 2 * LIMIT_PROBE))

if [ "$dry" -eq 1 ]; then
    gpu=dry-run
    out="${1:-$(mktemp -d)}"
else
    # Checked before anything is written: on a machine without a GPU the whole output is one line.
    gpu="$(cd / && timeout -k 5 "$LIMIT_DETECT" "$py" -c 'import re, torch; assert torch.cuda.is_available(); print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))' 2>/dev/null)" \
        || { echo "gpu_check: no CUDA GPU visible to $py (or no torch); nothing run" >&2; exit 2; }
    out="${1:-$root/benchmarks/results}"
fi

mkdir -p "$out" && out="$(cd "$out" && pwd)"
log="$out/gpu_check.log"
: > "$log"
exec > >(tee -a "$log") 2>&1  # tee writes each line as it comes: the log survives a kill
tee_pid=$!
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
cd "$out"  # never the source tree: `python -m` would put its tiecheck/ first on sys.path

echo "gpu_check: estimate: about 6-8 minutes on one H100 or H200; at most $total s ($((total / 60)) min $((total % 60)) s):" \
     "GPU check ${LIMIT_DETECT} s, preflight ${LIMIT_PREFLIGHT} s, default run ${LIMIT_DEFAULT} s," \
     "compiled max-batch run ${LIMIT_COMPILE} s (two compilations per variant), converge ${LIMIT_CONVERGE} s," \
     "FSDP2 on one rank ${LIMIT_FSDP2} s, ${GRACE} s kill grace, 20 s probes"
[ "$dry" -eq 1 ] && echo "gpu_check: --dry-run: every run on the CPU, tiny, without --compile and --find-max-batch"
echo "gpu_check: checkout $root, results in $out"
[ "$dry" -eq 1 ] || timeout -k 2 "$LIMIT_PROBE" nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,mig.mode.current --format=csv 2>/dev/null || true
timeout -k 5 "$LIMIT_PREFLIGHT" "$py" -c '
import sys, torch, tiecheck, tiecheck.models, tiecheck.bench
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("tiecheck from", tiecheck.__file__, "models from", tiecheck.models.__file__)
' || { echo "gpu_check: preflight failed: tiecheck does not import from $root; nothing run"; exit 1; }

plot=0
timeout -k 2 "$LIMIT_PROBE" "$py" -c 'import matplotlib' 2>/dev/null && plot=1

if [ "$dry" -eq 1 ]; then
    tiny=(--device cpu --model gpt-mini --batch-size 2 --seq-len 8 --rounds 2 --steps 1)
    gpu_only=()
    converge=(--device cpu --quick --steps 4 --eval-every 2 --seq-len 16 --vocab-size 300)
else
    tiny=()
    gpu_only=(--compile --find-max-batch)
    converge=()
fi

status=0
bench() {  # NAME LIMIT_SECONDS PLOT(0|1) OPTIONS...
    local name=$1 limit=$2 draw=$3; shift 3
    local table="$out/bench-$name-$gpu.txt" figure=()
    [ "$plot" -eq 1 ] && [ "$draw" -eq 1 ] && figure=(--plot "$out/bench-$name-$gpu.png")
    echo "== tiecheck bench $* (limit ${limit}s) -> $table"
    local t0=$SECONDS rc=0
    timeout -k 10 "$limit" "$py" -m tiecheck.cli bench "$@" --progress-lines -o "$table" ${figure[@]+"${figure[@]}"} || rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s$(case $rc in 124|137) echo ' (time limit: the table holds what was written before)';; esac)"
    [ -f "$table" ] && cat "$table"
    [ "$rc" -eq 0 ] || status=1
}

bench default "$LIMIT_DEFAULT" 1 ${tiny[@]+"${tiny[@]}"}
bench compile-maxbatch "$LIMIT_COMPILE" 1 --model gpt2-124m --mode train --dtype bf16 --rounds 12 --steps 3 \
    ${gpu_only[@]+"${gpu_only[@]}"} ${tiny[@]+"${tiny[@]}"}
bench converge "$LIMIT_CONVERGE" 1 --mode converge ${converge[@]+"${converge[@]}"}
bench fsdp2-1rank "$LIMIT_FSDP2" 0 --nproc-per-node 1 --strategy fsdp2 --rounds 6 --timeout $((LIMIT_FSDP2 - 5)) \
    ${tiny[@]+"${tiny[@]}"}
echo "gpu_check: done in $SECONDS s, exit $status"
exec >&- 2>&-
wait "$tee_pid" 2>/dev/null  # let tee write the last lines before the script ends
exit "$status"
