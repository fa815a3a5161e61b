#!/usr/bin/env bash
# The device bench in one command, sized to finish within TOTAL_S seconds (default 470) of its
# start and always to leave what finished packed in $OUT (results.tgz, models-<i>.tgz,
# log.txt), even when a stage fails, runs late or the whole command is killed (trap).
#
#   bash bench/device/run.sh                       # on the GPU machine, from the repo root
#   OAT_DEVICE_SMOKE=1 OUT=/tmp/out bash bench/device/run.sh   # tiny CPU run of every step
#
# Needs .whl/ (timm, torchattacks wheels; installed into $SITE) and
# .devdata/cifar10-jpeg.tar.gz (extracted into /tmp/cifar) in the repo root.
# Stages, each under its own `timeout`, in this order:
#   0. install the wheels, print the machine and versions, extract the data;
#   A. bench/device/stage_a.py: the trade-off models of issues 11/12 (bench/tradeoff.py, one
#      process each on the one GPU, epochs sized to the time left);
#   B. bench/overhead.py --device cuda --quick --out ...    (only if it exists and has those flags)
#   C. bench/multiexit.py --device cuda --out ...           (only if it exists and has those flags)
#   (B and C also get --data <extracted CIFAR-10 folder> when they have a --data option.)
#   then pack.
# Environment (seconds unless said): TOTAL_S (470), STAGE_A_S (default: all the time the other
# stages and packing do not reserve), OVERHEAD_S (60), MULTIEXIT_S (60), PACK_S (25);
# MULTIEXIT_PARALLEL=1 runs stage C beside stage A (same time limit) instead of after B;
# DEMO_MODEL=1 also trains the demo's checkpoint beside stage A (bench/demo_model.py,
# DEMO_MODEL_ARGS; results in $RESULTS_DIR/demo_model);
# STAGE_A_ARGS / OVERHEAD_ARGS / MULTIEXIT_ARGS (extra options), TRADEOFF_ARGS (options for
# every bench/tradeoff.py run), DEVICE (cuda), PYTHON (python3), SITE (/tmp/site: where the
# wheels go), CIFAR_DIR (/tmp/cifar),
# RESULTS_DIR (/tmp/oat-device-results), OUT ($OUT, else bench/out/device).
set -u
T0=$(date +%s)
cd "$(dirname "$0")/../.."
SMOKE=${OAT_DEVICE_SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  : "${DEVICE:=cpu}" "${TOTAL_S:=1500}" "${OVERHEAD_S:=120}" "${MULTIEXIT_S:=120}"
  : "${STAGE_A_ARGS:=--runs film,smart,pgd-at --max-epochs 1 --calibrate-steps 2 --eval-batch-size 64}"
  : "${TRADEOFF_ARGS:=--n-train 512 --n-examples 64 --steps 2 --lambdas 0,0.5,1 --resident-data}"
fi
DEVICE=${DEVICE:-cuda}
TOTAL_S=${TOTAL_S:-470}
OVERHEAD_S=${OVERHEAD_S:-60}
MULTIEXIT_S=${MULTIEXIT_S:-60}
PACK_S=${PACK_S:-25}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
CIFAR_DIR=${CIFAR_DIR:-/tmp/cifar}
RES=${RESULTS_DIR:-/tmp/oat-device-results}
OUT=${OUT:-$PWD/bench/out/device}
mkdir -p "$OUT" "$RES"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MPLBACKEND=Agg MPLCONFIGDIR=/tmp/mplconfig

elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "[run.sh +$(elapsed)s] $*"; }
left() { echo $(( TOTAL_S - $(elapsed) - PACK_S )); }
# has SCRIPT FLAG...: the script exists and names every flag (its options are not run)
has() { local f=$1; shift; [ -f "$f" ] || return 1; for flag; do grep -q -- "\"$flag\"" "$f" || return 1; done; }
min() { [ "$1" -lt "$2" ] && echo "$1" || echo "$2"; }
alive() { [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status"; }  # not a zombie
data_flag() { has "$1" --data && echo "--data $CIFAR_DIR"; }  # the extracted data, if it reads any

PACKED=0
STAGE_PID=
GPU_MON=
pack() {
  [ "$PACKED" = 1 ] && return; PACKED=1
  [ -n "$GPU_MON" ] && kill "$GPU_MON" 2>/dev/null
  if [ -n "$STAGE_PID" ] && kill -0 "$STAGE_PID" 2>/dev/null; then  # a stage cut short:
    kill -TERM "$STAGE_PID"  # timeout passes it on; give the stage 20 s to stop its runs
    for _ in $(seq 20); do alive "$STAGE_PID" || break; sleep 1; done
    kill -KILL "$STAGE_PID" 2>/dev/null
  fi
  say "packing $RES into $OUT"
  for f in "$RES"/stage_a/pids.txt; do  # runs of stage A still alive (killed stage): ours only
    [ -f "$f" ] && while read -r pid; do  # only if that pid is still one of our runs
      { tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null | grep -q -- "$RES/stage_a/runs" \
        && kill -9 "$pid" && say "killed run $pid"
    done < "$f"
  done
  echo "stages: $(cat "$RES/stages.txt" 2>/dev/null | tr '\n' ';')"
  timeout -k 5 "$PACK_S" "$PY" bench/device/pack.py --results "$RES" --dest "$OUT" \
    || { say "pack.py failed; plain tar of the small files"; \
         tar czf "$OUT/results.tgz" --exclude='*.pt' -C "$RES" . ; }
  ls -la "$OUT"
  say "done"
}
trap 'say "stopped by a signal"; pack; exit 143' TERM INT
trap pack EXIT

# stage NAME SECONDS COMMAND...: run it under timeout, record how it ended
stage() {
  local name=$1 seconds=$2; shift 2
  if [ "$seconds" -lt 20 ]; then say "$name skipped: ${seconds}s left"; echo "$name skipped" >> "$RES/stages.txt"; return; fi
  say "$name: up to ${seconds}s: $*"
  local t=$(date +%s)
  # in the background: a signal to this script runs its trap now, not after the stage
  timeout -k 10 "$seconds" "$@" &
  STAGE_PID=$!
  wait "$STAGE_PID"
  local rc=$?
  STAGE_PID=
  say "$name ended rc=$rc after $(( $(date +%s) - t ))s"
  echo "$name rc=$rc $(( $(date +%s) - t ))s" >> "$RES/stages.txt"
}

# -- 0. environment and data --------------------------------------------------------------
say "smoke=$SMOKE device=$DEVICE total=${TOTAL_S}s results=$RES out=$OUT"
command -v nvidia-smi >/dev/null && nvidia-smi
nproc --all; free -g 2>/dev/null | head -2
timeout 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" .whl/*.whl \
  || say "wheel install failed"
"$PY" - <<'EOF'
import sys, torch, torchvision
print("python", sys.version.split()[0], "torch", torch.__version__, "torchvision",
      torchvision.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
import timm, torchattacks, oat_plugins
print("timm", timm.__version__, timm.__file__, "torchattacks", torchattacks.__version__,
      "oat_plugins", oat_plugins.__version__)
EOF
if [ ! -d "$CIFAR_DIR/train" ]; then
  mkdir -p "$CIFAR_DIR" && timeout 120 tar xzf .devdata/cifar10-jpeg.tar.gz -C "$CIFAR_DIR" \
    || say "extracting the data failed"
fi
say "data: $(ls "$CIFAR_DIR" 2>/dev/null | tr '\n' ' ')"
if command -v nvidia-smi >/dev/null; then  # GPU load through the stages, every 2 s
  nvidia-smi --query-gpu=timestamp,utilization.gpu,utilization.memory,memory.used,power.draw \
    --format=csv -l 2 > "$RES/gpu.csv" 2>&1 &
  GPU_MON=$!
fi

# -- A. trade-off models, with the jobs that run beside it ----------------------------------
RESERVE=0
has bench/overhead.py --device --quick --out && RESERVE=$(( RESERVE + OVERHEAD_S ))
ME_PARALLEL=${MULTIEXIT_PARALLEL:-0}
has bench/multiexit.py --device --out && [ "$ME_PARALLEL" != 1 ] && RESERVE=$(( RESERVE + MULTIEXIT_S ))
A_S=$(( $(left) - RESERVE ))
[ -n "${STAGE_A_S:-}" ] && A_S=$(min "$STAGE_A_S" "$(left)")
# beside NAME COMMAND...: start a job that shares the GPU with stage A's runs from their start
# (so stage A's step timing, and its plan, already count it), under stage A's time limit
BESIDE=()
beside() {
  local name=$1; shift
  say "$name (beside A): up to ${A_S}s: $*"
  timeout -k 10 "$A_S" "$@" > "$RES/$name.log" 2>&1 &
  BESIDE+=("$name:$!")
}
await_beside() {
  local job rc
  for job in "${BESIDE[@]}"; do
    wait "${job#*:}"; rc=$?
    say "${job%%:*} (beside A) ended rc=$rc"; echo "${job%%:*} rc=$rc (beside A)" >> "$RES/stages.txt"
    tail -n 30 "$RES/${job%%:*}.log"
  done
}
if [ "$ME_PARALLEL" = 1 ] && has bench/multiexit.py --device --out; then
  # shellcheck disable=SC2086
  beside multiexit "$PY" bench/multiexit.py --device "$DEVICE" --out "$RES/multiexit" \
    $(data_flag bench/multiexit.py) ${MULTIEXIT_ARGS:-}
fi
if [ "${DEMO_MODEL:-0}" = 1 ] && has bench/demo_model.py --device --out; then
  # the checkpoint `oat-plugins demo` ships, with its card (bench/demo_model.py)
  # shellcheck disable=SC2086
  beside demo_model "$PY" bench/demo_model.py --device "$DEVICE" --out "$RES/demo_model" \
    --data "$CIFAR_DIR" --no-progress ${DEMO_MODEL_ARGS:-}
fi
# shellcheck disable=SC2086  # the *_ARGS are word lists
stage A "$A_S" "$PY" bench/device/stage_a.py --data "$CIFAR_DIR" --out "$RES/stage_a" \
  --budget-s $(( A_S - 10 )) --device "$DEVICE" ${STAGE_A_ARGS:-} -- ${TRADEOFF_ARGS:-}
await_beside

# -- B, C. optional stages -------------------------------------------------------------------
if has bench/overhead.py --device --quick --out; then
  # shellcheck disable=SC2086
  stage overhead "$(min "$OVERHEAD_S" "$(left)")" "$PY" bench/overhead.py --device "$DEVICE" \
    --quick --out "$RES/overhead" $(data_flag bench/overhead.py) ${OVERHEAD_ARGS:-}
else
  say "overhead stage skipped: bench/overhead.py lacks --device/--quick/--out"
fi
if [ "$ME_PARALLEL" = 1 ]; then
  :  # ran beside stage A
elif has bench/multiexit.py --device --out; then
  # shellcheck disable=SC2086
  stage multiexit "$(min "$MULTIEXIT_S" "$(left)")" "$PY" bench/multiexit.py --device "$DEVICE" \
    --out "$RES/multiexit" $(data_flag bench/multiexit.py) ${MULTIEXIT_ARGS:-}
else
  say "multiexit stage skipped: bench/multiexit.py missing or lacks --device/--out"
fi
