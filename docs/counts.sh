#!/usr/bin/env bash
# Do more generated anomalies make a better or a worse detector? Per category and generator run (docs/toy_vae.sh's
# runs), sample.py draws 256 anomalies per defect type; the first 16, 64 and all 256 of each type (nested: the 64
# hold the 16) go into evaluate.py's real+axf row (the real row's batches draw for draw, these in extra slots), over
# downstream seeds DSEEDS. The real row (0 generated) comes from docs/downstream.sh's result of the same run.
#
#     SEEDS="0 1" bash docs/counts.sh      # after docs/toy_vae.sh's and docs/downstream.sh's runs of those seeds
#     bash docs/counts.sh summary           # each count against the one before it, and against real
#
# Per generator run: samples/counts/<category>-s<seed>-full/ (the 256), -n<k>/ (hard links to the first k),
# results/counts/<category>-s<seed>-n<k>.json, and results/counts/merged/<category>-s<seed>.json (real and the counts
# as rows of one file, for docs/compare.py). The subsets have no manifest, so evaluate.py draws no control from them.
set -euo pipefail
CATEGORIES=${CATEGORIES:-bottle cable pill} SEEDS=${SEEDS:-0 1} DSEEDS=${DSEEDS:-0,1,2} COUNTS="16 64 256"
[ "${1:-}" = summary ] && SEEDS=
mkdir -p results/counts/merged
for s in $SEEDS; do for c in $CATEGORIES; do
  full=samples/counts/$c-s$s-full/$c
  [ -f "samples/counts/$c-s$s-full/done" ] || {
    python sample.py --toy --category "$c" --ckpt "runs/toy_vae/$c/all-s$s" --n 256 --out_dir "$full" \
      > "results/counts/$c-s$s-sample.log" 2>&1 && touch "samples/counts/$c-s$s-full/done"; }
  for k in $COUNTS; do
    out=results/counts/$c-s$s-n$k.json sub=samples/counts/$c-s$s-n$k/$c
    [ -f "$out" ] && continue
    rm -rf "samples/counts/$c-s$s-n$k"
    for d in "$full"/test/*/; do
      d=$(basename "$d"); [ "$d" = good ] && continue
      mkdir -p "$sub/test/$d" "$sub/ground_truth/$d" "$sub/prompt/$d"
      for i in $(seq 0 $((k - 1))); do n=$(printf %03d "$i")
        ln "$full/test/$d/$n.png" "$sub/test/$d/" && ln "$full/ground_truth/$d/${n}_mask.png" "$sub/ground_truth/$d/"
        ln "$full/prompt/$d/$n.txt" "$sub/prompt/$d/"
      done
    done
    python evaluate.py --toy --category "$c" --generated "$sub" --methods real+axf --seeds "$DSEEDS" --out "$out" \
      > "results/counts/$c-s$s-n$k.log" 2>&1 || { echo "failed: $out"; continue; }
    echo "done: $out"
  done
done; done
python - $COUNTS <<'PY'
import json, sys
from pathlib import Path
for real in sorted(Path("results/downstream").glob("*-s*.json")):
    rows = {"real": json.loads(real.read_text())["real"]}
    counts = [Path(f"results/counts/{real.stem}-n{k}.json") for k in sys.argv[1:]]
    if all(f.is_file() for f in counts):
        rows.update({f"real+axf {k}": json.loads(f.read_text())["real+axf"] for k, f in zip(sys.argv[1:], counts)})
        Path(f"results/counts/merged/{real.name}").write_text(json.dumps(rows))
PY
ls results/counts/merged/*.json > /dev/null 2>&1 || exit 0
python docs/compare.py --chain results/counts/merged/*.json real
python docs/compare.py --methods results/counts/merged/*.json real
