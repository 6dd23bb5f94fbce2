#!/usr/bin/env bash
# Learned masks downstream: per category and generator run (docs/attention_levels.sh's level1 rows, the toy defaults),
# sample.py --masks learned draws N anomalies per type; evaluate.py's real+axf row trains the segmenter (20 epochs)
# on the real few plus them in extra slots, at downstream seeds DSEEDS; merged with the same run's rows on the
# jittered few-shot masks (docs/downstream.sh, run first as below) into one file per run, then compared:
#
#     SEEDS="0 1 2" bash docs/attention_levels.sh             # the generators
#     CATEGORIES="bottle pill" SEEDS="0 1 2" DSEEDS=0,1 NAME=downstream_level1_epochs4 \
#         GENERATED=samples/attention_levels ROW=level1 EXTRA="--seg_epochs 20" bash docs/downstream.sh
#     bash docs/learned_masks.sh                               # then: bash docs/learned_masks.sh summary
#
# Per generator run: samples/learned_masks/<category>-level1-s<seed>/, results/learned_masks/<category>-s<seed>.json
# and results/learned_masks/merged/<category>-s<seed>.json (the jittered masks' rows and "real+axf learned"); the
# toy checks' recall on both kinds of masks in results/learned_masks/checks/ (control is drawn from the checkpoint,
# the same for both).
set -euo pipefail
CATEGORIES=${CATEGORIES:-bottle pill} SEEDS=${SEEDS:-0 1 2} DSEEDS=${DSEEDS:-0,1} N=${N:-48}
JITTERED=${JITTERED:-results/downstream_level1_epochs4}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ "${1:-}" = summary ] && SEEDS=
mkdir -p results/learned_masks/merged
for s in $SEEDS; do for c in $CATEGORIES; do
  run=runs/attention_levels/$c/level1-s$s out=samples/learned_masks/$c-level1-s$s/$c json=results/learned_masks/$c-s$s.json
  [ -f "samples/learned_masks/$c-level1-s$s/done" ] || {
    python sample.py --toy --category "$c" --ckpt "$run" --n "$N" --masks learned --out_dir "$out" \
      > "results/learned_masks/$c-s$s-sample.log" 2>&1 && touch "samples/learned_masks/$c-level1-s$s/done"; }
  [ -f "$json" ] || python evaluate.py --toy --category "$c" --generated "$out" --methods real+axf --seeds "$DSEEDS" \
    --seg_epochs 20 --out "$json" > "results/learned_masks/$c-s$s.log" 2>&1
  echo "done: $json"
done; done
python - "$JITTERED" <<'PY'
import json, sys
from pathlib import Path
checks = Path("results/learned_masks/checks")
checks.mkdir(exist_ok=True)
for learned in sorted(Path("results/learned_masks").glob("*-s*.json")):
    jittered = Path(sys.argv[1]) / learned.name
    if jittered.is_file():
        rows, new = json.loads(jittered.read_text()), json.loads(learned.read_text())
        category, seed = learned.stem.rsplit("-s", 1)
        for name, result in (("jittered", rows), ("learned", new)):
            recall = {k: v for k, v in result["toy_checks"].items() if k != "control"}  # control: the checkpoint's, alike
            (checks / f"{category}-{name}-s{seed}.json").write_text(json.dumps({"toy_checks": recall}))
        rows["real+axf learned"] = new["real+axf"]
        Path("results/learned_masks/merged", learned.name).write_text(json.dumps(rows))
PY
ls results/learned_masks/merged/*.json > /dev/null 2>&1 || exit 0
python docs/compare.py --methods results/learned_masks/merged/*.json real          # every row against the real few
python docs/compare.py --methods results/learned_masks/merged/*.json real+axf      # ... against the jittered masks
python docs/compare.py results/learned_masks/checks jittered learned
