#!/usr/bin/env bash
# The methods comparison of issue 15 (docs/methods.md). Run from the repo root:
#   bash tools/methods.sh        (about 1.5 CPU-hours on 2 cores; re-run it to resume)
# Every step reuses what is finished (shards, the teacher, caches, runs, committed summaries).
# Digits at 32 px, the first 512 training images, tiny_cnn students of a resnet_s teacher
# trained on the consistent views it is asked about (the set-up of docs/patience.md), 60
# epochs, 3 seeds, retrieval mAP at each evaluation.
set -euo pipefail
W=$(realpath -m "${W:-runs/methods}")  # run directories and caches (not committed)
R=$(pwd)/docs/results/methods  # committed run summaries
source tools/digits_teacher.sh  # K, stamp, CONS; the shards and the teacher in $W
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
# 5. InDistill's width alignment alone: resnet_s's 4.bn2 and 5.bn2 (64 and 128 channels, before
#    the shortcut is added) pruned to tiny_cnn's 5 and 9 (32 and 64), compared by MSE, plus KL.
$K ablate "${COMMON[@]}" --results $R/pruned --out pruned --mode online:"$CONS" \
  --features 4.bn2=5,5.bn2=9 --prune-teacher --loss 'kl+mse' | tail -1 > pruned.json
stamp pruned
# 6. InDistill: the pruned maps and the embeddings one at a time in the first 12 epochs (the
#    reference's 3, 4, 5), MSE then PKT, then KL for the remaining 48.
$K ablate "${COMMON[@]}" --results $R/indistill --out indistill --mode online:"$CONS" \
  --features 4.bn2=5,5.bn2=9,embed=embed --prune-teacher --curriculum 4.bn2:3,5.bn2:4,embed:5 \
  --loss kl | tail -1 > indistill.json
stamp indistill
# 7. InDistill as the reference ends it: PKT on the embeddings to the end, no logit loss (a
#    retrieval model: its head is never trained, so its accuracy means nothing).
$K ablate "${COMMON[@]}" --results $R/indistill_rest --out indistill_rest --mode online:"$CONS" \
  --features 4.bn2=5,5.bn2=9,embed=embed --prune-teacher \
  --curriculum 4.bn2:3,5.bn2:4,embed:rest --loss kl | tail -1 > indistill_rest.json
stamp indistill_rest
# 8. Avatar KD from the cache (issue 16): a cache of the same consistent views holding 4 avatar
#    ensembles per view (dropout 0.1 on the input of resnet_s's last stage, the default site),
#    KL plus the avatars' KL, weighted by uncertainty or not, against step 1's plain KL (the
#    avatar cache's teacher rows are step 1's cache's: the same views, plan and teacher).
$K ablate "${COMMON[@]}" --results $R/avatars --out avatars --mode cached:"$CONS" --avatars 4 \
  --loss 'kl+avatar_kl' --loss "kl+avatar_kl(uncertainty='none')" \
  | tail -1 > avatars.json
stamp avatars
# 9. Avatar KD online, as the reference does it: dropout avatars of resnet_s's stages 2 and 3,
#    standardised, channel-wise distillation onto tiny_cnn's blocks 2 and 3 (1x1 connectors).
$K ablate "${COMMON[@]}" --results $R/akd --out akd --mode online:"$CONS" --akd-features 4=6,5=10 \
  --loss kl | tail -1 > akd.json
stamp akd
