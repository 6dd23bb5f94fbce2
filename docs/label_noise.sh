#!/usr/bin/env bash
# Label noise as a cause: per category and generator run, docs/faithful_subset.py splits the run's samples into the
# faithful ones (the toy checks pass them) and as many per defect type drawn at random from all; evaluate.py trains
# real+axf on each (the real few-shot anomalies, the subset in extra slots), at the toy preset with EXTRA's flags.
#
#     CATEGORIES="bottle cable" SEEDS="0 1 2" bash docs/label_noise.sh
#     python docs/compare.py results/label_noise random faithful     # paired by generator run
#
# Per run: samples/label_noise/<category>-ROW-s<seed>-{faithful,random}/ and
# results/label_noise/<category>-{faithful,random}-s<seed>.json (a finished one is skipped).
set -euo pipefail
CATEGORIES=${CATEGORIES:-bottle cable} SEEDS=${SEEDS:-0 1 2} DSEEDS=${DSEEDS:-0,1}
GENERATED=${GENERATED:-samples/attention_levels} ROW=${ROW:-level1} EXTRA=${EXTRA:---seg_epochs 20}
mkdir -p results/label_noise
for s in $SEEDS; do for c in $CATEGORIES; do
  name=$c-$ROW-s$s
  [ -d "samples/label_noise/$name-random/$c" ] || python docs/faithful_subset.py --category "$c" \
    --generated "$GENERATED/$name/$c" --out samples/label_noise --name "$name" --seed "$s"
  for kind in random faithful; do
    out=results/label_noise/$c-$kind-s$s.json
    [ -f "$out" ] && continue
    python evaluate.py --toy --category "$c" --generated "samples/label_noise/$name-$kind/$c" --methods real+axf \
      --seeds "$DSEEDS" --out "$out" $EXTRA > "${out%.json}.log" 2>&1 || { echo "failed: $out"; continue; }
    echo "done: $out"
  done
done; done
