#!/usr/bin/env bash
# The reduced patience experiment of issue 14 (docs/patience.md). Run from the repo root:
#   bash tools/patience.sh        (about 3 CPU-hours on 2 cores; re-run it to resume)
# Resumable: every step
# reuses what is finished (shards, the teacher run, caches, runs, committed summaries).
set -euo pipefail
W=$(realpath -m "${W:-runs/patience}")  # run directories and caches (not committed)
R=$(pwd)/docs/results/patience  # committed run summaries
source tools/digits_teacher.sh  # K, stamp, CONS; the shards and the teacher in $W
FM='inception_crop(min_area=0.25)|flip|mixup'
# One shared cache directory for every step (precompute extends a cache to what a step needs);
# each step has its own --out and summary directory (run directories are named by the grid).
mkdir -p caches
for step in grid online long cache_sample cache_cycle fm1000 long1000 vpd; do
  mkdir -p $step; [ -e $step/caches ] || ln -s $W/caches $step/caches
done
COMMON=(--data 'data/train-*.tar' --val 'data/val-*.tar' --teacher kdcache:resnet_s
  --teacher-weights $W/teacher/model.pt --student kdcache:tiny_cnn --image-size 32
  --batch-size 64 --lr 3e-3 --limit 512 --workers 1 --eval-every 5 -q --json)
# 1. Patience, 3 seeds: budgets 10 (the grid), 30, 100.
$K ablate "${COMMON[@]}" --results $R/grid --out grid --epochs 10 --seeds 3 --patience 30,100 \
  --mode none:"$CONS" --mode fixed --mode cached:"$CONS" --mode cached:"$FM" | tail -1 > grid.json
stamp grid
# 2. Online at two short budgets, for parity with cached.
$K ablate "${COMMON[@]}" --results $R/online --out online --epochs 10 --seeds 1 --patience 30 \
  --mode online:"$FM" | tail -1 > online.json
stamp online
# 3. Longer, 3 seeds: 300 epochs for every mode.
$K ablate "${COMMON[@]}" --results $R/long --out long --epochs 300 --seeds 3 \
  --mode none:"$CONS" --mode fixed --mode cached:"$CONS" --mode cached:"$FM" | tail -1 > long.json
stamp long
# 4. Cache budget at 300 epochs, function matching: caches of 10, 30, 100 epochs, --reuse sample,
#    and the 10-epoch cache cycled.
$K ablate "${COMMON[@]}" --results $R/cache_sample --out cache_sample --epochs 300 --seeds 1 --cache-sizes 10,30,100 \
  --reuse sample --mode cached:"$FM" | tail -1 > cache_budget.json
stamp cache-sample
$K ablate "${COMMON[@]}" --results $R/cache_cycle --out cache_cycle --epochs 300 --seeds 1 --cache-sizes 10 \
  --mode cached:"$FM" | tail -1 > cache_cycle.json
stamp cache-cycle
# 5. Function matching at 1000 epochs, 1 seed (the 300-epoch cache, sampled).
$K ablate "${COMMON[@]}" --results $R/fm1000 --out fm1000 --epochs 1000 --seeds 1 --reuse sample --cache-epochs 300 \
  --mode cached:"$FM" | tail -1 > fm1000.json
stamp fm1000
# 6. --views-per-decode 4 (each image's 4 views of a pass from one decode, together in the
#    stream): function matching at 300 epochs, 3 seeds, against step 3's runs.
$K ablate "${COMMON[@]}" --results $R/vpd --out vpd --epochs 300 --seeds 3 --views-per-decode 4 \
  --mode cached:"$FM" | tail -1 > vpd.json
stamp vpd
# 7. Hard labels and consistent views at 1000 epochs, 1 seed (the same 300-epoch cache, sampled):
#    does function matching's 0.972 beat them there?
$K ablate "${COMMON[@]}" --results $R/long1000 --out long1000 --epochs 1000 --seeds 1 --reuse sample \
  --cache-epochs 300 --mode none:"$CONS" --mode cached:"$CONS" | tail -1 > long1000.json
stamp long1000
