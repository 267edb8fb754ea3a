#!/bin/bash
# Issue 8's GPU checks, for a CUDA machine (H100 / H200), in steps that STEPS names (default all):
#   bench:    benchmarks/benchmark.py --quick (EfficientPS-B5 eager, bf16, as CUDA graphs (the
#             ROI heads too in graph-heads-bf16) and Panoptic FPN R50 at 512x1024 and 1024x2048,
#             the dense network alone, bf16 training with a profile of its launches) into
#             $OUT/results-gpu;
#   compiled: the compiled bf16 path at 1024x2048 alone into $OUT/results-gpu-compiled
#             (compiling takes a minute or more);
#   tests:    the CUDA-only tests (CUDA graphs, the fusion on the GPU);
#   job:      the main job (the quick synthetic config) under bf16 AMP, keeping its panoptic PNGs,
#             then --eval-only of its checkpoint as a CUDA graph in fp32 and bf16 (the ROI heads
#             too in heads16) and on the model's own modules, each compared pixel by pixel with
#             the job's own evaluation.
#
#   OUT=gpu_out bash benchmarks/gpu_checks.sh                             # about 13 minutes at most
#   STEPS="bench compiled tests" OUT=gpu_out bash benchmarks/gpu_checks.sh  # 7.5 minutes at most
#
# Its time limits fit one H200 run of 2026-11-28 (on torch 2.11): the benchmark's inference took
# 105 s and each training precision's first step about a minute of cuDNN autotuning; the CUDA
# tests took 42 s, each evaluation 20-25 s, and the quick job needs about 3 minutes (its first 60
# iterations about 1 s each, 0.15-0.2 s after; it was stopped at 140 s, iteration 200 of 300).
# Every step is bounded by `timeout` and writes its log under $OUT as it goes, so a stopped run
# still leaves what it did. $OUT gets summary.txt (steps with exit statuses, nvidia-smi, the pixel
# comparison and the PQ of each run) and each step's log and results. On a machine without
# network, WHEELS names a folder of wheels to install (offline) into /tmp/site first; a
# detectron2 source tree at .venv/detectron2-src (as scripts/setup_env.sh unpacks it) is put on
# the path if present.
# For a dry run on the CPU: DEVICE=cpu PY=.venv/bin/python STEPS="bench tests job" (Inductor
# compiles for minutes on a CPU) plus shorter steps, e.g.
# BENCH_OPTS="--sizes 128x256 --repeats 2 --warmup 1 --models ours-fast theirs"
# TRAIN_OPTS="SOLVER.MAX_ITER 5 SOLVER.AMP.ENABLED False" (Detectron2's AMP training needs CUDA)
# EVAL_S=150 (an evaluation of the 50 validation images takes 7 s on 2 idle CPU cores, 20-35 s
# with other jobs running).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_checks_out}; mkdir -p "$OUT"
WORK=${WORK:-$(mktemp -d /tmp/gpu_checks.XXXXXX)}; mkdir -p "$WORK"  # checkpoints, PNGs, data
PY=${PY:-python3}; DEVICE=${DEVICE:-cuda}; TRAIN_OPTS=${TRAIN_OPTS:-}
STEPS=" ${STEPS:-bench compiled tests job} "
S="$OUT/summary.txt"
log() { echo "$(date +%T) $*" | tee -a "$S"; }
want() { [[ "$STEPS" == *" $1 "* ]]; }
log start
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl > "$WORK/pip.log" 2>&1
  rc=$?; log "pip rc=$rc"; if [ $rc != 0 ]; then tail -30 "$WORK/pip.log" >> "$S"; exit 1; fi
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
[ -d .venv/detectron2-src ] && export PYTHONPATH=$PWD/.venv/detectron2-src:${PYTHONPATH:-}
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# The model zoo reads the configs through this link, which an installed package has built in.
[ -e efficientps_d2/model_zoo/configs ] || ln -s ../../configs efficientps_d2/model_zoo/configs
{ nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"; } >> "$S" 2>&1

if want bench; then
  log "benchmark"
  timeout "${BENCH_S:-240}" $PY benchmarks/benchmark.py --quick --device "$DEVICE" \
    --paths bf16 graph graph-bf16 graph-heads-bf16 ${BENCH_OPTS:-} --output "$OUT/results-gpu" \
    > "$OUT/bench.log" 2>&1
  log "benchmark rc=$?"
fi
if want compiled; then
  log "compiled path"
  timeout "${COMPILED_S:-150}" $PY benchmarks/benchmark.py --quick --device "$DEVICE" \
    --models ours-fast --paths compiled-bf16 --sizes 1024x2048 --train-precisions none \
    ${BENCH_OPTS:-} --output "$OUT/results-gpu-compiled" > "$OUT/compiled.log" 2>&1
  log "compiled rc=$?"
fi
if want tests; then
  log "cuda tests"
  timeout "${TEST_S:-60}" $PY -m pytest -q -p no:cacheprovider tests/test_fast_paths.py \
    tests/test_fusion.py tests/test_inplace_abn.py tests/test_mask_paste.py \
    -k "cuda or graph" > "$OUT/tests.log" 2>&1
  log "tests rc=$?"
fi
if ! want job; then log done; exit 0; fi

CFG=configs/Synthetic-PanopticSegmentation/efficientps_b0_quick.yaml
export DETECTRON2_DATASETS=${DETECTRON2_DATASETS:-$WORK/datasets}
log "quick job, bf16 AMP"
timeout "${TRAIN_S:-200}" $PY train_net.py --config-file $CFG MODEL.DEVICE "$DEVICE" \
  SOLVER.AMP.ENABLED True SOLVER.AMP.PRECISION bfloat16 OUTPUT_DIR "$WORK/quick" \
  TEST.KEEP_PANOPTIC_PNGS True $TRAIN_OPTS > "$OUT/train.log" 2>&1
log "train rc=$?"
# The job's last checkpoint (model_final.pth unless its time limit stopped it earlier).
WEIGHTS="$WORK/quick/$(cat "$WORK/quick/last_checkpoint" 2>/dev/null)"
log "weights $WEIGHTS"

for name in graph32 graph16 heads16 plain; do
  graph="MODEL.EFFICIENTPS.CUDA_GRAPH True"
  case $name in
    graph32) opts="$graph" ;;
    graph16) opts="$graph MODEL.EFFICIENTPS.INFERENCE_DTYPE bfloat16" ;;
    heads16) opts="$graph MODEL.EFFICIENTPS.INFERENCE_DTYPE bfloat16"
      opts="$opts MODEL.EFFICIENTPS.CUDA_GRAPH_ROI_HEADS True" ;;
    plain) opts="MODEL.EFFICIENTPS.FAST_INFERENCE False" ;;  # the model's own modules, eager
  esac
  log "eval $name"
  echo "===== eval $name" >> "$OUT/eval.log"
  timeout "${EVAL_S:-30}" $PY train_net.py --config-file $CFG --eval-only \
    MODEL.WEIGHTS "$WEIGHTS" MODEL.DEVICE "$DEVICE" OUTPUT_DIR "$WORK/$name" \
    TEST.KEEP_PANOPTIC_PNGS True $opts >> "$OUT/eval.log" 2>&1
  log "eval $name rc=$?"
done

WORK="$WORK" $PY - >> "$S" 2>&1 <<'PY'
import glob, os
import numpy as np
from PIL import Image
work = os.environ["WORK"]
reference = sorted(glob.glob(f"{work}/quick/inference/*/panoptic/*.png"))
if not reference:
    print("no PNGs to compare with: the quick job stopped before its own evaluation")
for name in ("graph32", "graph16", "heads16", "plain"):
    differing = total = found = 0
    for path in reference:
        other = path.replace(f"{work}/quick/", f"{work}/{name}/")
        if os.path.exists(other):
            found += 1
            a, b = np.asarray(Image.open(path)), np.asarray(Image.open(other))
            differing += int((a != b).any(-1).sum())
            total += a.shape[0] * a.shape[1]
    print(f"{name}: {found} of {len(reference)} PNGs, {differing} of {total} pixels differ")
PY
{ echo "PQ rows (the quick job, then the evaluations graph32, graph16, heads16, plain):"
  grep -A2 "copypaste: Task: panoptic_seg" "$OUT/train.log" | tail -1
  grep -A2 "copypaste: Task: panoptic_seg" "$OUT/eval.log" | grep -v "Task\|PQ,\|^--"; } >> "$S"
log done
