#!/usr/bin/env bash
# One sampling setting against the default, on the same trained models: the toy defaults' runs of
# docs/toy_vae.sh (every module on, the paper's UNet, the toy CLIP and VAE, 900 steps), sampled again with FLAGS
# and judged by evaluate.py --toy as those runs were (--n N per defect type, the downstream segmenter seeded s;
# the control samples drawn with FLAGS too, from the folder's manifest). Only the sampling differs between the
# two rows of a pair: the checkpoint, the masks and normals drawn, the judge and the segmenter's seed are shared.
#
#     NAME=guidance1 FLAGS="--guidance_scale 1" SEEDS="0 1" bash docs/sampling.sh   # after docs/toy_vae.sh
#     NAME=guidance1 bash docs/sampling.sh summary
#
# Per run: samples/$NAME/<category>-all-s<seed>/, results/$NAME/<category>-all-s<seed>.json and a log beside it.
# The summary pairs them with docs/toy_vae.sh's results in results/${NAME}_pair (rows: default, $NAME) for
# docs/compare.py.
set -euo pipefail
CATEGORIES=${CATEGORIES:-bottle cable pill} SEEDS=${SEEDS:-0 1} N=${N:-48} NAME=${NAME:?a name for the setting}
FLAGS=${FLAGS:-}
[ "${1:-}" = summary ] && SEEDS=
for s in $SEEDS; do for c in $CATEGORIES; do
  run=runs/toy_vae/$c/all-s$s out=results/$NAME/$c-all-s$s.json
  [ -f "$out" ] && continue
  [ -f "results/toy_vae/$c-all-s$s.json" ] || { echo "missing: docs/toy_vae.sh's run $run"; continue; }
  mkdir -p "results/$NAME"
  { python sample.py --toy --category "$c" --ckpt "$run" --n "$N" --out_dir "samples/$NAME/$c-all-s$s/$c" $FLAGS &&
    python evaluate.py --toy --category "$c" --generated "samples/$NAME/$c-all-s$s/$c" --methods axf --seeds "$s" \
      --out "$out"; } > "results/$NAME/$c-all-s$s.log" 2>&1 || { echo "failed: $c seed $s (results/$NAME/$c-all-s$s.log)"; continue; }
  echo "done: $c seed $s"
done; done

pair() {  # row, result file, log: links where docs/compare.py looks for them
  mkdir -p "results/${NAME}_pair" "runs/${NAME}_pair/$c/$1-s$s"
  ln -sf "$PWD/$2" "results/${NAME}_pair/$c-$1-s$s.json" && cat "$3" > "runs/${NAME}_pair/$c/$1-s$s/log.txt"
}
for f in results/$NAME/*-all-s*.json; do
  [ -f "$f" ] || continue
  b=$(basename "$f" .json); c=${b%%-*}; s=${b##*-s}
  pair default "results/toy_vae/$c-all-s$s.json" "runs/toy_vae/$c/all-s$s/log.txt"
  pair "$NAME" "$f" "results/$NAME/$c-all-s$s.log"
done
python docs/compare.py "results/${NAME}_pair" default "$NAME"
