#!/usr/bin/env bash
# Does synthesis pay off downstream? Per category and generator run (docs/toy_vae.sh's runs: the toy defaults, every
# module on, seeds varying every stage), evaluate.py trains the segmenter and the classifier on the real few-shot
# anomalies (real), on the same batches with the run's generated anomalies in extra slots (real+axf), and on the
# same with the controls in their place: the real few flipped, turned and colour-jittered (real+aug) or pasted onto
# normal images (real+crop_paste), at the generated counts. Downstream seeds DSEEDS train each row; a generator run
# is the unit of the summary (its mean over the downstream seeds), so the spread includes the generator's seed.
#
#     SEEDS="0 1" bash docs/downstream.sh       # after docs/toy_vae.sh's runs of those seeds
#     bash docs/downstream.sh summary            # the paired table of the runs finished so far
#
# Per generator run: results/downstream/<category>-s<seed>.json (and .md). A finished one is skipped. More
# evaluate.py flags in EXTRA (e.g. "--seg_epochs 20" for 4x the segmenter's epochs, with NAME=downstream_epochs4), other
# rows in METHODS; other generators' samples in GENERATED/<category>-ROW-s<seed>/<category> (e.g. GENERATED=
# samples/attention_levels ROW=level1, docs/attention_levels.sh's).
set -euo pipefail
CATEGORIES=${CATEGORIES:-bottle cable pill} SEEDS=${SEEDS:-0 1} DSEEDS=${DSEEDS:-0,1,2,3,4}
NAME=${NAME:-downstream} GENERATED=${GENERATED:-samples/toy_vae} ROW=${ROW:-all} EXTRA=${EXTRA:-}
METHODS=${METHODS:-real,real+axf,real+aug,real+crop_paste}
[ "${1:-}" = summary ] && SEEDS=
mkdir -p "results/$NAME"
for s in $SEEDS; do for c in $CATEGORIES; do
  out=results/$NAME/$c-s$s.json
  [ -f "$out" ] && continue
  python evaluate.py --toy --category "$c" --generated "$GENERATED/$c-$ROW-s$s/$c" --methods "$METHODS" \
    --seeds "$DSEEDS" --out "$out" $EXTRA > "results/$NAME/$c-s$s.log" 2>&1 || { echo "failed: $out"; continue; }
  echo "done: $out"
done; done
ls results/$NAME/*-s*.json > /dev/null 2>&1 && python docs/compare.py --methods results/$NAME/*-s*.json real
