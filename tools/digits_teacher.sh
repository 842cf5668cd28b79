# Sourced, from the repo root, by tools/patience.sh and tools/methods.sh (after they set W, the
# work directory): the kdcache command K, the stamp helper and the consistent views CONS, then
# in $W the digits shards and the teacher both experiments use (resnet_s on the consistent views
# it will be asked about, 40 epochs, docs/patience.md). Both steps reuse what is finished.
K=${K:-$(pwd)/.venv/bin/kdcache}
mkdir -p "$W" && cd "$W"
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
