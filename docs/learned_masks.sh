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
# Other sample.py flags in place of --masks learned: SAMPLE_FLAGS, with NAME (the folders) and LABEL (the row), e.g.
#     NAME=wide_places LABEL=wide SAMPLE_FLAGS="--jitter large --similar_normals 0" bash docs/learned_masks.sh
#
# Per generator run: samples/$NAME/<category>-level1-s<seed>/, results/$NAME/<category>-s<seed>.json
# and results/$NAME/merged/<category>-s<seed>.json (the jittered masks' rows and "real+axf <LABEL>"); the
# toy checks' recall on both kinds of masks in results/$NAME/checks/ (control is drawn from the checkpoint,
# the same for both).
set -euo pipefail
CATEGORIES=${CATEGORIES:-bottle pill} SEEDS=${SEEDS:-0 1 2} DSEEDS=${DSEEDS:-0,1} N=${N:-48}
JITTERED=${JITTERED:-results/downstream_level1_epochs4}
NAME=${NAME:-learned_masks} LABEL=${LABEL:-learned} SAMPLE_FLAGS=${SAMPLE_FLAGS:---masks learned}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ "${1:-}" = summary ] && SEEDS=
mkdir -p results/$NAME/merged
for s in $SEEDS; do for c in $CATEGORIES; do
  run=runs/attention_levels/$c/level1-s$s out=samples/$NAME/$c-level1-s$s/$c json=results/$NAME/$c-s$s.json
  [ -f "samples/$NAME/$c-level1-s$s/done" ] || {
    python sample.py --toy --category "$c" --ckpt "$run" --n "$N" $SAMPLE_FLAGS --out_dir "$out" \
      > "results/$NAME/$c-s$s-sample.log" 2>&1 && touch "samples/$NAME/$c-level1-s$s/done"; }
  [ -f "$json" ] || python evaluate.py --toy --category "$c" --generated "$out" --methods real+axf --seeds "$DSEEDS" \
    --seg_epochs 20 --out "$json" > "results/$NAME/$c-s$s.log" 2>&1
  echo "done: $json"
done; done
python - "$JITTERED" "$NAME" "$LABEL" <<'PY'
import json, sys
from pathlib import Path
jittered_folder, name, label = sys.argv[1:]
checks = Path("results", name, "checks")
checks.mkdir(exist_ok=True)
for learned in sorted(Path("results", name).glob("*-s*.json")):
    jittered = Path(jittered_folder) / learned.name
    if jittered.is_file():
        rows, new = json.loads(jittered.read_text()), json.loads(learned.read_text())
        category, seed = learned.stem.rsplit("-s", 1)
        for row, result in (("jittered", rows), (label, new)):
            recall = {k: v for k, v in result["toy_checks"].items() if k != "control"}  # control: the checkpoint's, alike
            (checks / f"{category}-{row}-s{seed}.json").write_text(json.dumps({"toy_checks": recall}))
        rows[f"real+axf {label}"] = new["real+axf"]
        Path("results", name, "merged", learned.name).write_text(json.dumps(rows))
PY
ls results/$NAME/merged/*.json > /dev/null 2>&1 || exit 0
python docs/compare.py --methods results/$NAME/merged/*.json real          # every row against the real few
python docs/compare.py --methods results/$NAME/merged/*.json real+axf      # ... against the jittered masks
python docs/compare.py results/$NAME/checks jittered "$LABEL"
