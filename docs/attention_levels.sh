#!/usr/bin/env bash
# The toy UNet's attention at both levels (--unet_attention_levels 0,1: the 16x16 and 8x8 feature maps of the
# 16x16 latent) against level 1 only (--unet_attention_levels 1, the toy default this measurement chose: no
# transformer blocks at 16x16, where self-attention over 256 tokens is the largest part of the step). Rows "both" and "level1", per category and seed s: the quick start's
# training (toy defaults, 900 steps, stage 2 and 3 seeded s), sample.py --n N per defect type, evaluate.py --toy
# (recall, control, the downstream segmenter seeded s). One thread per run, two runs at a time:
#
#     SEEDS="0 1 2" bash docs/attention_levels.sh      # the runs (a finished one is skipped)
#     bash docs/attention_levels.sh summary             # the paired table of those finished so far
#
# Per run: runs/attention_levels/<category>/<row>-s<seed>/ (checkpoints, log.txt),
# results/attention_levels/<category>-<row>-s<seed>.json.
set -uo pipefail
CATEGORIES=${CATEGORIES:-bottle pill} SEEDS=${SEEDS:-0 1 2} N=${N:-48} JOBS=${JOBS:-2}
export OMP_NUM_THREADS=1

one() {  # category seed row
  local c=$1 s=$2 row=$3 levels=0,1 run=runs/attention_levels/$1/$3-s$2
  [ "$row" = level1 ] && levels=1
  [ -f "results/attention_levels/$c-$row-s$s.json" ] && return 0
  mkdir -p "$run" results/attention_levels
  { python train.py --toy --category "$c" --out_dir "$run" --seed "$s" --unet_attention_levels "$levels" &&
    python sample.py --toy --category "$c" --ckpt "$run" --n "$N" --out_dir "samples/attention_levels/$c-$row-s$s/$c" &&
    python evaluate.py --toy --category "$c" --generated "samples/attention_levels/$c-$row-s$s/$c" --methods axf \
      --seeds "$s" --out "results/attention_levels/$c-$row-s$s.json"; } >> "$run/log.txt" 2>&1 &&
    echo "done: $run" || echo "failed: $run"
}
export -f one
export N

if [ "${1:-}" != summary ]; then
  for s in $SEEDS; do for c in $CATEGORIES; do for row in both level1; do echo "$c $s $row"; done; done; done |
    xargs -P "$JOBS" -L 1 bash -c 'one $0 $1 $2'
fi
python docs/compare.py results/attention_levels both level1
