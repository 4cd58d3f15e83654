#!/usr/bin/env bash
# Issue 29: GPU figures from one prepared command on a lent H100/H200 (bench/gpu/README.md).
#
#   step 1 wrn    KERAS_BACKEND=jax cifarflow train wrn --set precision=mixed_bfloat16 for a training-time
#                 budget (default 5 min): test accuracy with and without flip TTA, images/s, epochs
#   step 2 fast   cifarflow train fast on JAX (the full recipe): time to its 6-view TTA accuracy, against
#                 airbench94's own PyTorch script (.gpu/airbench94.py, not committed) on the same GPU and
#                 the same decoded data, in the same command, as a ratio
#   step 3 lite0  cifarflow train efficientnet_lite0 --set resolution=224 for a budget (default 2 min)
#
# `cifarflow train --time-budget` has not landed: a budgeted step first runs bench/gpu/probe.py, which
# times 2 epochs of each phase of the recipe's plan on a few thousand images with the trainer's own
# functions (epoch 0 = XLA compilation + an epoch, epoch 1 = a steady epoch), projects a steady epoch to
# the run's images and takes epochs = floor((budget - compilation - fixed epochs) / epoch seconds); the
# run is then an ordinary `cifarflow train --epochs N` (its schedule complete), and its train_seconds,
# reported beside the budget, shows how close the projection came. A probe that finds the compiled
# predictions of a mixed-precision model not finite (seen on JAX 0.11.2's XLA:CPU with the WRN in
# mixed_bfloat16, not on 0.10.2) times float32 instead, and the run trains in float32, noted in the summary.
#
# Time: every step runs under `timeout` in its own box, and the whole command keeps to a deadline
# (default 540 s = 9 min, so that a lent machine's 15 minutes hold a start, this command, and a rerun of
# part of it with --only). A budget is scaled down to what the deadline leaves once the later steps'
# usual overheads are set aside, shared in proportion with the later budget (wrn 300 : lite0 120 by
# default; with the default deadline and the usual overheads roughly 140 s and 55 s; --only wrn gives
# wrn its 5 min), printed and noted in the summary; a step whose box would be under its minimum is
# skipped. On the device the ImageNet checkpoint of efficientnet_lite0 cannot be downloaded (no
# network): step 3 loads .gpu/efficientnet_lite0_imagenet_headless.weights.h5 (the recipe's ImageNet
# weights, converted here by bench/gpu/prepare.sh; weights=PATH) when it travelled, else it trains from
# scratch (weights=none, source_task=true: every layer and BatchNorm trained).
#
# Environment: with wheels in .whl/ (bench/gpu/fetch_wheels.sh) they are installed into /tmp/site and
# PYTHONPATH=/tmp/site:src (cifarflow from this checkout, no build); python3 is the device's (JAX with
# CUDA, PyTorch). --smoke runs every step on this CPU with the project's .venv (when there is one),
# TensorFlow imports blocked as on the device, tiny settings, in under 5 minutes; airbench94 is skipped.
# Every run is logged to sqlite:///OUT/mlflow.db (artifacts stay in a scratch folder under /tmp); OUT
# also gets run.log, steps.jsonl and summary.md (bench/gpu/summary.py), 4 files in all.
#
#   bash bench/gpu/run.sh [--smoke] [--data ARCHIVE] [--out DIR] [--only wrn,fast,lite0] [--plan]
#                         [--deadline S] [--wrn-budget S] [--lite-budget S]
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

usage() {
  sed -n '/^#   bash bench/,/^#  *\[--deadline/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,3\}//'
  cat <<'EOF'
  --smoke         the same steps on this CPU under JAX with tiny settings (< 5 min)
  --data ARCHIVE  CIFAR-10 JPEG archive (default .gpu/cifar10-jpeg.tar.gz if present, else
                  ../shared/data/cifar10-jpeg.tar.gz)
  --out DIR       results folder (default $OUT if set, else bench/gpu/out)
  --only STEPS    comma-separated subset of wrn,fast,lite0 (fast includes airbench94)
  --plan          print the steps, their time boxes and commands, and exit
  --deadline S    the whole command's seconds (default 540; smoke 290)
  --wrn-budget S  step 1's training seconds (default 300; smoke 20)
  --lite-budget S step 3's training seconds (default 120; smoke 15)
EOF
}

SMOKE=0 PLAN=0 DATA="" OUTDIR="${OUT:-}" ONLY="wrn,fast,lite0" DEADLINE="" WRN_BUDGET="" LITE_BUDGET=""
while (($#)); do
  case $1 in
    --smoke) SMOKE=1 ;;
    --plan|--dry-run) PLAN=1 ;;
    --data) DATA=${2:?--data needs a path}; shift ;;
    --data=*) DATA=${1#*=} ;;
    --out) OUTDIR=${2:?--out needs a folder}; shift ;;
    --out=*) OUTDIR=${1#*=} ;;
    --only) ONLY=${2:?--only needs steps}; shift ;;
    --only=*) ONLY=${1#*=} ;;
    --deadline) DEADLINE=${2:?}; shift ;;
    --wrn-budget) WRN_BUDGET=${2:?}; shift ;;
    --lite-budget) LITE_BUDGET=${2:?}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
for s in ${ONLY//,/ }; do
  case $s in wrn|fast|lite0) ;; *) echo "run.sh: --only takes wrn, fast, lite0, not $s" >&2; exit 2 ;; esac
done
has() { [[ ",$ONLY," == *",$1,"* ]]; }

# ---- settings: full (device) and smoke (this CPU) ------------------------------------------------
if ((SMOKE)); then
  MODE=smoke
  DEADLINE=${DEADLINE:-290} WRN_BUDGET=${WRN_BUDGET:-20} LITE_BUDGET=${LITE_BUDGET:-15}
  PREP_BOX=150 PROBE_BOX=90 POST_BOX=90 FAST_BOX=100 AIRBENCH_BOX=0 MIN_BOX=20
  SMOKE_TRAIN_PER_CLASS=100 SMOKE_TEST_PER_CLASS=50  # the data: 1,000 + 500 images of the archive
  WRN_PROBE_IMAGES=256 LITE_PROBE_IMAGES=100
  WRN_ARGS=(--set precision=mixed_bfloat16 --set depth=10 --set width=1)
  FAST_ARGS=(--epochs 1 --set 'widths=[16,32,32]' --set data_init_images=512)
  LITE_ARGS=(--limit 256 --set resolution=32 --set fine_tune_fraction=0.0)  # phase 2 trains the head only: XLA compiles a small backward pass
  # what a step usually takes beyond its budget (probe, loading, scoring, logging): the clamp's reserve
  EST_PROBE=50 EST_POST=35 EST_FAST=45 EST_AIRBENCH=0
else
  MODE=full
  DEADLINE=${DEADLINE:-540} WRN_BUDGET=${WRN_BUDGET:-300} LITE_BUDGET=${LITE_BUDGET:-120}
  PREP_BOX=180 PROBE_BOX=150 POST_BOX=120 FAST_BOX=180 AIRBENCH_BOX=120 MIN_BOX=30
  # not a multiple of the batch (128, 64) after the 10% validation split, like the run: its last, partial
  # batch compiles a second train step, counted in the probe's compile seconds too
  WRN_PROBE_IMAGES=5000 LITE_PROBE_IMAGES=2500
  WRN_ARGS=(--set precision=mixed_bfloat16)
  FAST_ARGS=()
  LITE_ARGS=(--set resolution=224)
  EST_PROBE=60 EST_POST=40 EST_FAST=75 EST_AIRBENCH=40
fi
if [[ -z $DATA ]]; then
  DATA=$REPO/../shared/data/cifar10-jpeg.tar.gz
  [[ -f $REPO/.gpu/cifar10-jpeg.tar.gz ]] && DATA=$REPO/.gpu/cifar10-jpeg.tar.gz
fi
OUTDIR=${OUTDIR:-$REPO/bench/gpu/out}
LITE_WEIGHTS=$REPO/.gpu/efficientnet_lite0_imagenet_headless.weights.h5
AIRBENCH=$REPO/.gpu/airbench94.py
if [[ -f $LITE_WEIGHTS ]]; then
  LITE_W=(--set "weights=$LITE_WEIGHTS") LITE_PHASE=fine_tune LITE_SIZE=fine_tune_epochs
  LITE_WHY="ImageNet weights from $LITE_WEIGHTS (weights=PATH; the recipe's checkpoint, converted by prepare.sh)"
else
  LITE_W=(--set weights=none --set source_task=true) LITE_PHASE=source LITE_SIZE=epochs
  LITE_WHY="weights=none, source_task=true: from scratch (no ImageNet weights offline; bench/gpu/prepare.sh makes them)"
fi

print_plan() {
  cat <<EOF
bench/gpu/run.sh plan ($MODE): deadline ${DEADLINE} s for the whole command; steps: ${ONLY}
  data $DATA$( ((SMOKE)) && echo " (smoke: the first $SMOKE_TRAIN_PER_CLASS train + $SMOKE_TEST_PER_CLASS test images per class of it)")
  out  $OUTDIR (mlflow.db, run.log, steps.jsonl, summary.md)
step 0 prepare: time box ${PREP_BOX} s: install .whl/*.whl into /tmp/site when present (full mode), check that
        jax, keras, mlflow and cifarflow import (KERAS_BACKEND=jax, no TensorFlow), decode the archive into the cache
EOF
  has wrn && cat <<EOF
step 1 wrn: probe time box ${PROBE_BOX} s (bench/gpu/probe.py wrn: 2 epochs on ${WRN_PROBE_IMAGES} images), then
        cifarflow train wrn --epochs <probe> ${WRN_ARGS[*]}
        training budget ${WRN_BUDGET} s (scaled to fit the deadline), time box budget + ${POST_BOX} s
EOF
  if has fast; then
    cat <<EOF
step 2 fast: time box ${FAST_BOX} s: cifarflow train fast ${FAST_ARGS[*]}
EOF
    if ((SMOKE)); then
      echo "step 2 airbench94 reference: skipped (smoke)"
    else
      echo "step 2 airbench94 reference: time box ${AIRBENCH_BOX} s: bench/gpu/airbench_ref.py --script .gpu/airbench94.py --runs 2 (CUDA PyTorch)"
    fi
  fi
  has lite0 && cat <<EOF
step 3 lite0: probe time box ${PROBE_BOX} s (bench/gpu/probe.py efficientnet_lite0: 2 epochs per phase on ${LITE_PROBE_IMAGES} images), then
        cifarflow train efficientnet_lite0 ${LITE_ARGS[*]} ${LITE_W[*]} $([[ $LITE_SIZE == epochs ]] && echo "--epochs <probe>" || echo "--set $LITE_SIZE=<probe>")
        (${LITE_WHY})
        training budget ${LITE_BUDGET} s (scaled to fit the deadline), time box budget + ${POST_BOX} s
EOF
  echo "summary: bench/gpu/summary.py -> $OUTDIR/summary.md"
}

if ((PLAN)); then
  print_plan
  exit 0
fi

# ---- environment ---------------------------------------------------------------------------------
START=$SECONDS
[[ -f $DATA ]] || { echo "run.sh: no data archive at $DATA (pass --data)" >&2; exit 2; }
DATA=$(cd "$(dirname "$DATA")" && pwd)/$(basename "$DATA")
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
rm -f "$OUTDIR/steps.jsonl" "$OUTDIR/summary.md"
exec > >(tee -a "$OUTDIR/run.log") 2>&1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cifarflow-gpu.XXXXXX")
LOGS=$WORK/logs
mkdir -p "$LOGS"
cleanup() { [[ ${KEEP_WORK:-0} == 1 ]] || rm -rf "$WORK"; }
trap cleanup EXIT

log() { printf '[%4ds] %s\n' $((SECONDS - START)) "$*"; }
left() { echo $((DEADLINE - (SECONDS - START))); }
min() { (($1 < $2)) && echo "$1" || echo "$2"; }

PY=${RUN_PYTHON:-python3}  # RUN_PYTHON: another interpreter (e.g. a Python 3.12 rehearsal of the device)
PYPATH=$REPO/src
if ((SMOKE)); then
  [[ -z ${RUN_PYTHON:-} && -x $REPO/.venv/bin/python ]] && PY=$REPO/.venv/bin/python
  # TensorFlow is installed in this venv but not on the device: make its import fail, as
  # tests/test_backends.py does (a sys.meta_path finder, not sys.modules["tensorflow"] = None)
  mkdir -p "$WORK/no_tensorflow"
  cat > "$WORK/no_tensorflow/sitecustomize.py" <<'EOF'
import sys

class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError(f"{name} is blocked by bench/gpu/run.sh --smoke (not installed on the device)")
        return None

sys.meta_path.insert(0, _NoTensorFlow())
EOF
  PYPATH=$WORK/no_tensorflow:$PYPATH
fi
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
export MLFLOW_TRACKING_URI="sqlite:///$OUTDIR/mlflow.db"
export CIFARFLOW_RECIPES=$REPO/experiments CIFARFLOW_CHECKPOINTS=$WORK/checkpoints
((SMOKE)) || export CIFARFLOW_CACHE=${CIFARFLOW_CACHE:-$WORK/cache}
# one persistent XLA cache for the command's processes: a run reuses what its probe compiled that is the
# same program (initializers, test steps; not the train step, whose schedule constants differ)
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK/jax-cache}
((SMOKE)) && export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}
cd "$WORK"  # MLflow's artifacts (./mlruns) and checkpoints stay out of OUT
CF=("$PY" -m cifarflow.cli)

# one JSON object per line in OUT/steps.jsonl; VALUE is parsed as JSON when it is JSON, else kept as a string
record() {
  "$PY" - "$OUTDIR/steps.jsonl" "$@" <<'EOF'
import json, sys
path, *items = sys.argv[1:]
out = {}
for item in items:
    key, _, value = item.partition("=")
    try:
        out[key] = json.loads(value)
    except ValueError:
        out[key] = value
with open(path, "a") as f:
    f.write(json.dumps(out) + "\n")
EOF
}

# boxed NAME BOX LOGFILE CMD...: run CMD under `timeout` (SIGINT, so that cifarflow marks its run KILLED),
# output to the terminal and LOGFILE; sets RC (124: out of time) and WALL
boxed() {
  local name=$1 box=$2 logf=$3 t0=$SECONDS
  shift 3
  log "$name: time box ${box} s: $*"
  set +e
  timeout --signal=INT --kill-after=30 "$box" "$@" 2>&1 | tee "$logf"
  RC=${PIPESTATUS[0]}
  set -e
  WALL=$((SECONDS - t0))
  log "$name: exit $RC after ${WALL} s"
}
status_of() { case $1 in 0) echo ok ;; 124|137) echo timeout ;; *) echo failed ;; esac; }
# the run's id: cifarflow's last line names it ("run ID: test_accuracy=..."), and so does its message when
# the box interrupts it ("training interrupted; run ID is saved ..."): a cut-off run's epochs still count
run_id_in() { grep -oE '(^|; )run [0-9a-f]{32}' "$1" | tail -1 | grep -oE '[0-9a-f]{32}' || true; }
last_json() { grep -E '^\{' "$1" | tail -1 || true; }

log "bench/gpu/run.sh $MODE on ${HOSTNAME:-?}, deadline ${DEADLINE} s, steps $ONLY; work $WORK"

# ---- step 0: prepare -----------------------------------------------------------------------------
# (a function run in an `if`, where set -e does not hold: each command checks itself)
prepare() {
  if ((!SMOKE)) && compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    log "installing $(ls "$REPO"/.whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
    timeout "$PREP_BOX" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$REPO"/.whl/*.whl || return 1
  fi
  timeout "$PREP_BOX" "$PY" - <<'EOF' || return 1
import platform
import jax, keras, mlflow, pydantic, sqlalchemy
import cifarflow.cli  # noqa: F401
try:
    import tensorflow  # noqa: F401
    tf = f"tensorflow {tensorflow.__version__} importable"
except ImportError:
    tf = "no tensorflow"
print(f"python {platform.python_version()}, jax {jax.__version__} {jax.devices()}, keras {keras.__version__} "
      f"({keras.backend.backend()}), mlflow {mlflow.__version__}, {tf}")
EOF
  if ((SMOKE)); then  # the first N images of each class (one pass): scoring 10,000 test images would not fit
    timeout "$PREP_BOX" "$PY" - "$SOURCE_DATA" "$DATA" "$SMOKE_TRAIN_PER_CLASS" "$SMOKE_TEST_PER_CLASS" <<'EOF' || return 1
import sys, tarfile
src, dst, n_train, n_test = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
taken = {}
with tarfile.open(src) as tin, tarfile.open(dst, "w:gz") as tout:
    for m in tin:  # cifar10-jpeg/{train,test}/<class>/<NNNN>.jpg
        if m.isfile() and m.name.endswith(".jpg"):
            key = tuple(m.name.split("/")[-3:-1])
            if taken.get(key, 0) < (n_train if key[0] == "train" else n_test):
                taken[key] = taken.get(key, 0) + 1
                tout.addfile(m, tin.extractfile(m))
print(f"smoke data: {n_train} train + {n_test} test images per class of {src} -> {dst}")
EOF
  fi
  timeout "$PREP_BOX" "$PY" - "$DATA" <<'EOF' || return 1
import sys, time
from cifarflow.data import datasets
t = time.perf_counter()
ds = datasets.load(sys.argv[1])
print(f"data: {len(ds.y_train)} train + {len(ds.y_test)} test images, sha256 {ds.checksum[:12]}, "
      f"{time.perf_counter() - t:.1f} s (decoded into the cache on a first run)")
EOF
}
t0=$SECONDS
log "step 0 prepare: time box ${PREP_BOX} s per command"
if ((!SMOKE)) && compgen -G "$REPO/.whl/*.whl" >/dev/null; then PYPATH=/tmp/site:$PYPATH; fi
export PYTHONPATH=$PYPATH${PYTHONPATH:+:$PYTHONPATH}
if ((SMOKE)); then SOURCE_DATA=$DATA DATA=$WORK/smoke-data.tar.gz; fi
if ! prepare; then
  log "prepare failed: nothing else can run"
  record step=prepare status=failed wall_s=$((SECONDS - t0)) || true
  exit 1
fi
log "prepare: done in $((SECONDS - t0)) s"

# what the steps after STEP usually need beyond their budgets (probes, loading, scoring, logging), and
# their budgets: a budget that does not fit is scaled with the later ones, in proportion (5:2 by default)
later_overhead() {
  local n=0
  case $1 in
    wrn) has fast && n=$((n + EST_FAST + EST_AIRBENCH)); has lite0 && n=$((n + EST_PROBE + EST_POST)) ;;
    fast) has lite0 && n=$((n + EST_PROBE + EST_POST)) ;;
  esac
  echo $n
}
later_budget() { [[ $1 == wrn ]] && has lite0 && echo "$LITE_BUDGET" || echo 0; }

# budgeted NAME RECIPE BUDGET PROBE_IMAGES PHASE SIZE_KEY ARGS...: probe, clamp, train, record
budgeted() {
  local name=$1 recipe=$2 budget=$3 images=$4 phase=$5 key=$6
  shift 6
  local probe_json=$LOGS/$name-probe.json note="" box epochs size t_step=$SECONDS
  box=$(min "$PROBE_BOX" $(($(left) - $(later_overhead "$name"))))
  if ((box < MIN_BOX)); then
    log "$name: skipped: ${box} s left for its probe before the deadline"
    record step="$name" status=skipped note="deadline: ${box} s left"
    return 0
  fi
  local probe_args=(--budget "$budget" --images "$images" --data "$DATA" --sized-phase "$phase")
  local rest=() a
  for a in "$@"; do rest+=("$a"); done
  # the probe takes the run's --limit and --set items (not --epochs: it sizes them)
  boxed "$name probe" "$box" "$LOGS/$name-probe.log" "$PY" "$HERE/probe.py" "$recipe" "${probe_args[@]}" "${rest[@]}"
  last_json "$LOGS/$name-probe.log" > "$probe_json"
  if ((RC != 0)) || [[ ! -s $probe_json ]]; then
    record step="$name" status="probe $(status_of "$RC")" wall_s=$((SECONDS - t_step))
    return 0
  fi
  local later fit
  later=$(later_budget "$name")
  fit=$(( ($(left) - $(later_overhead "$name") - EST_POST) * budget / (budget + later) ))
  if ((fit < budget)); then
    note="budget ${budget} s scaled to ${fit} s to keep the ${DEADLINE} s deadline"
    ((later)) && note="$note (sharing with the later budget of ${later} s in proportion)"
    log "$name: $note"
    budget=$(( fit > 1 ? fit : 1 ))
  fi
  local fallback
  fallback=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("precision_fallback", ""))' "$probe_json")
  if [[ -n $fallback ]]; then  # the probe found NaN predictions in mixed precision (see probe.py)
    note="${note:+$note; }$fallback"
    log "$name: $fallback"
    rest+=(--set precision=float32)
  fi
  epochs=$("$PY" "$HERE/probe.py" epochs-for "$probe_json" --budget "$budget")
  log "$name: $epochs epochs for a ${budget} s budget: $(cat "$probe_json")"
  if [[ $key == epochs ]]; then size=(--epochs "$epochs"); else size=(--set "$key=$epochs"); fi
  box=$(min $((budget + POST_BOX)) $(($(left) - 15)))  # 15 s: the SIGINT grace and the summary
  boxed "$name" "$box" "$LOGS/$name.log" "${CF[@]}" train "$recipe" --data "$DATA" "${rest[@]}" "${size[@]}"
  record step="$name" status="$(status_of "$RC")" run_id="$(run_id_in "$LOGS/$name.log")" wall_s="$WALL" \
    budget_s="$budget" planned_epochs="$epochs" probe="$(cat "$probe_json")" note="$note"
}

if has wrn; then
  log "step 1 wrn: the wrn recipe (WRN-28-10 + MixUp) ${WRN_ARGS[*]}, ${WRN_BUDGET} s training budget"
  budgeted wrn wrn "$WRN_BUDGET" "$WRN_PROBE_IMAGES" train epochs "${WRN_ARGS[@]}"
fi

if has fast; then
  log "step 2 fast: the fast recipe on JAX, then airbench94's PyTorch script"
  box=$(min "$FAST_BOX" $(($(left) - $(later_overhead fast) - MIN_BOX)))
  if ((box < MIN_BOX)); then
    log "fast: skipped: ${box} s left before the deadline"
    record step=fast status=skipped note="deadline: ${box} s left"
  else
    boxed fast "$box" "$LOGS/fast.log" "${CF[@]}" train fast --data "$DATA" "${FAST_ARGS[@]}"
    record step=fast status="$(status_of "$RC")" run_id="$(run_id_in "$LOGS/fast.log")" wall_s="$WALL"
  fi
  if ((SMOKE)); then
    echo "airbench94 reference: skipped (smoke)"
    record step=airbench94 status=skipped note="skipped (smoke)"
  elif [[ ! -f $AIRBENCH ]]; then
    echo "airbench94 reference: skipped ($AIRBENCH missing: bash bench/gpu/prepare.sh)"
    record step=airbench94 status=skipped note="skipped (.gpu/airbench94.py missing)"
  elif ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "airbench94 reference: skipped (no CUDA PyTorch)"
    record step=airbench94 status=skipped note="skipped (no CUDA PyTorch)"
  else
    box=$(min "$AIRBENCH_BOX" $(($(left) - $(later_overhead fast) - MIN_BOX)))
    boxed airbench94 "$box" "$LOGS/airbench94.log" "$PY" "$HERE/airbench_ref.py" --script "$AIRBENCH" \
      --data "$DATA" --runs 2 --work "$WORK/airbench"
    ref=$(last_json "$LOGS/airbench94.log")
    if ((RC == 0)) && [[ -n $ref ]]; then
      record step=airbench94 status=ok wall_s="$WALL" runs="$("$PY" -c 'import json,sys; print(json.dumps(json.loads(sys.argv[1])["runs"]))' "$ref")" \
        note="$("$PY" -c 'import json,sys; d=json.loads(sys.argv[1]); print(f"{d[\"device\"]}, torch {d[\"torch\"]}, data sha256 {d[\"dataset_sha256\"][:12]}")' "$ref")"
    else
      record step=airbench94 status="$(status_of "$RC")" wall_s="$WALL"
    fi
  fi
fi

if has lite0; then
  log "step 3 lite0: efficientnet_lite0 ${LITE_ARGS[*]}, ${LITE_BUDGET} s training budget; $LITE_WHY"
  budgeted lite0 efficientnet_lite0 "$LITE_BUDGET" "$LITE_PROBE_IMAGES" "$LITE_PHASE" "$LITE_SIZE" \
    "${LITE_ARGS[@]}" "${LITE_W[@]}"
fi

# ---- summary -------------------------------------------------------------------------------------
log "summary ($((SECONDS - START)) s so far)"
"$PY" "$HERE/summary.py" --store "$OUTDIR/mlflow.db" --steps "$OUTDIR/steps.jsonl" --out "$OUTDIR/summary.md" \
  --title "bench/gpu/run.sh $MODE, $(date -u +%Y-%m-%dT%H:%MZ), $((SECONDS - START)) s"
log "done in $((SECONDS - START)) s; results in $OUTDIR"
"$PY" - "$OUTDIR/steps.jsonl" <<'EOF'
import json, sys
bad = [s["step"] for s in map(json.loads, open(sys.argv[1])) if s.get("status") not in ("ok", "skipped")]
sys.exit(1 if bad else 0)
EOF
