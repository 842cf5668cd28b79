#!/usr/bin/env bash
# The methods comparison of issue 15 (docs/methods.md). Run from the repo root:
#   bash tools/methods.sh        (about 1 CPU-hour on 2 cores; re-run it to resume)
# Every step reuses what is finished (shards, the teacher, caches, runs, committed summaries).
# Digits at 32 px, the first 512 training images, tiny_cnn students of a resnet_s teacher
# trained on the consistent views it is asked about (the set-up of docs/patience.md), 60
# epochs, 3 seeds, retrieval mAP at each evaluation.
set -euo pipefail
K=${K:-$(pwd)/.venv/bin/kdcache}
W=$(realpath -m "${W:-runs/methods}")  # run directories and caches (not committed)
R=$(pwd)/docs/results/methods  # committed run summaries
mkdir -p $W && cd $W
t0=$(date +%s)
stamp() { echo "$(date +%H:%M:%S) +$(( $(date +%s) - t0 ))s $*"; }
CONS='inception_crop(min_area=0.25)|flip'
ls data/train-*.tar >/dev/null 2>&1 || $K shards --from digits --out data --split train --shard-size 256 -q
ls data/val-*.tar >/dev/null 2>&1 || $K shards --from digits --out data --split val --shard-size 256 -q
stamp shards
$K train --data 'data/train-*.tar' --val 'data/val-*.tar' --student kdcache:resnet_s \
  --out teacher --epochs 40 --teacher-mode none --views "$CONS" --image-size 32 \
  --batch-size 64 --lr 3e-3 --workers 1 --resume -q --json | tail -1 > teacher.json
stamp teacher
COMMON=(--data 'data/train-*.tar' --val 'data/val-*.tar' --teacher kdcache:resnet_s
  --teacher-weights $W/teacher/model.pt --student kdcache:tiny_cnn --image-size 32
  --batch-size 64 --lr 3e-3 --limit 512 --workers 1 --epochs 60 --seeds 3 --eval-every 10
  --retrieval -q --json)
# 1. Logit losses, cached (a 60-epoch cache of consistent views, K = C = 10).
$K ablate "${COMMON[@]}" --results $R/logit --out logit --mode cached:"$CONS" \
  --loss kl --loss 'kl(t=4)' --loss 'soft_ce(t=4)' --loss reverse_kl --loss dkd \
  --loss 'kl+ce(w=0.5)' | tail -1 > logit.json
stamp logit
# 2. Hard labels on the same views.
$K ablate "${COMMON[@]}" --results $R/hard --out hard --mode none:"$CONS" | tail -1 > hard.json
stamp hard
# 3. Feature maps, online: resnet_s stages 2 and 3 (64 x 16 x 16, 128 x 8 x 8) onto tiny_cnn's
#    blocks 2 and 3 (32 x 16 x 16, 64 x 8 x 8), with plain online KL for the step-time ratio.
$K ablate "${COMMON[@]}" --results $R/maps --out maps --mode online:"$CONS" --features 4=6,5=10 \
  --loss kl --loss 'kl+fitnet' --loss 'kl+at(w=1000)' | tail -1 > maps.json
stamp maps
# 4. Relations on the embeddings (the heads' inputs: 128 and 64 wide), online.
$K ablate "${COMMON[@]}" --results $R/embed --out embed --mode online:"$CONS" --features 7=12 \
  --loss 'kl+rkd' --loss 'kl+pkt' | tail -1 > embed.json
stamp embed
