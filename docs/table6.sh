#!/usr/bin/env bash
# The paper's Table 6 on the toy world: five rows of switches (none; text; text + MIF; text + DDF; all), each
# trained on every toy category with three seeds of stage 3, sampled, and judged by evaluate.py --toy (the
# caption's colour drawn, the defect type, the downstream segmenter and classifier on held-out real anomalies).
#
#     bash docs/table6.sh                          # the whole table, from the repository's root
#     CATEGORIES=cable SEEDS=0 bash docs/table6.sh # one slice of it
#     EXTRA="--steps 2 --vae_steps 2 --mask_steps 2" N=1 bash docs/table6.sh   # a smoke test of the commands
#
# Stages 1 and 2 (the VAE and the mask encoder) do not depend on the switches: each category trains them once,
# in its all-modules seed-0 run, and the other runs start from copies (train.py resumes a finished stage and
# checks only the keys its network depends on). Results: results/table6/<category>-<row>-s<seed>.json (.md).
set -euo pipefail
CATEGORIES=${CATEGORIES:-cable bottle pill}
SEEDS=${SEEDS:-0 1 2}
N=${N:-16}            # samples per defect type
EXTRA=${EXTRA:-}      # more train.py flags, the same for every run
declare -A ROWS=(
  [none]="--use_text False --use_mif False --use_ddf False"
  [text]="--use_text True --use_mif False --use_ddf False"
  [text+mif]="--use_text True --use_mif True --use_ddf False"
  [text+ddf]="--use_text True --use_mif False --use_ddf True"
  [all]="--use_text True --use_mif True --use_ddf True"
)
for c in $CATEGORIES; do
  base=runs/table6/$c/all-s0
  python train.py --toy --category "$c" --out_dir "$base" --seed 0 $EXTRA   # stages 1-3 with every module
  for row in none text text+mif text+ddf all; do
    for s in $SEEDS; do
      run=runs/table6/$c/$row-s$s
      [ "$run" = "$base" ] || { mkdir -p "$run" && cp -n "$base/vae.pt" "$base/mask_ae.pt" "$run/"; }
      python train.py --toy --category "$c" --out_dir "$run" --seed "$s" ${ROWS[$row]} $EXTRA
      python sample.py --toy --category "$c" --ckpt "$run" --n "$N" --out_dir "samples/table6/$c-$row-s$s/$c"
      python evaluate.py --toy --category "$c" --generated "samples/table6/$c-$row-s$s/$c" --methods axf \
        --seeds "$s" --out "results/table6/$c-$row-s$s.json"
    done
  done
done
