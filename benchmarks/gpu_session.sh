#!/usr/bin/env bash
# Issue 15's GPU measurements for one lent machine, in the order they matter, each time-boxed so that the
# whole fits one device call (at most 600 s a call; 4 x 120 s + 60 s here; 15 minutes of device time a session).
#
#   bash benchmarks/gpu_wheels.sh                                           # here: .whl/
#   device run: command "bash benchmarks/gpu_session.sh", carry [".whl"], timeout_s 600
#
# What comes back under $OUT: sim_throughput_gpu.{json,md} (the rows measured, merged into the file's
# earlier H200 rows), gpu_check.{json,md}, the GPU's name and a log; copy them to docs/benchmarks/ here.
# The first runs are the in-process backend with clients side by side (sim.client_workers=K, one torch
# thread each, launching into the one CUDA context) against the centralized side with K threads, then one
# client at a time with this code, then the CUDA paths check.
#
# A dry run here, in a Python 3.12 environment without graftfl's packages (as the device's image):
#   DRY_RUN=1 PYTHON=/path/to/python3.12 PIP="pip --python /path/to/python3.12" OUT=/tmp/out bash benchmarks/gpu_session.sh
# runs the same steps on the CPU with 200 clients of 50 images, into sim_throughput_gpu_dryrun.{json,md}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/graftfl-gpu-out}
PYTHON=${PYTHON:-python3}
PIP=${PIP:-$PYTHON -m pip}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
tee_pid=$!
started=$SECONDS
deadline=$((started + 570))  # the call's 600 s, less a margin to copy the results
touch "$OUT/.started"  # results newer than this were written by this session
# shellcheck disable=SC2086
$PIP install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::UserWarning
if [ -n "${DRY_RUN:-}" ]; then
  workload=(--device cpu --population 200 --output sim_throughput_gpu_dryrun)
  results=sim_throughput_gpu_dryrun
else
  workload=()
  results=sim_throughput_gpu
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
fi
"$PYTHON" -c "import torch, flwr; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'flwr', flwr.__version__)" || exit 1

step() {  # step SECONDS COMMAND...: run COMMAND for at most SECONDS (less if the call's time runs out); its exit status
  local budget=$1 left=$((deadline - SECONDS)) rc=0
  shift
  [ "$left" -lt "$budget" ] && budget=$left
  if [ "$budget" -lt 20 ]; then
    echo "== skipped (${left} s left): $*"
    return 1
  fi
  echo "== $(date -u +%H:%M:%S) ($((SECONDS - started)) s in) at most ${budget} s: $*"
  timeout "$budget" "$@" || rc=$?
  [ "$rc" -eq 0 ] || echo "== exit $rc (124: out of time)"
  return "$rc"
}
keep() {  # keep FILE...: copy to $OUT the files this session wrote (not the checkout's older ones)
  local file
  for file in "$@"; do
    if [ "$file" -nt "$OUT/.started" ]; then cp "$file" "$OUT"/; fi
  done
}
fed() {  # fed WORKERS N: the pfl CIFAR-10 workload in-process, N clients per round, WORKERS clients side by side
  step 120 "$PYTHON" benchmarks/sim_throughput.py --gpu --backends inprocess --gpu-clients-per-round "$2" \
    --client-workers "$1" --threads "$1" --repeats 2 --merge ${workload[@]+"${workload[@]}"}  # (an empty array under set -u: bash < 4.4)
  keep "docs/benchmarks/$results.json" "docs/benchmarks/$results.md"  # written when a run ends (one cut short writes nothing)
}
fed 4 100
fed 8 100
fed 1 100
fed 4 50
if [ -z "${DRY_RUN:-}" ]; then
  step 60 "$PYTHON" benchmarks/gpu_check.py && keep docs/benchmarks/gpu_check.json docs/benchmarks/gpu_check.md
fi
echo "== done in $((SECONDS - started)) s"
exec >&- 2>&-  # let tee see the end of the log, and wait for it to write it all
wait "$tee_pid" 2>/dev/null || true
