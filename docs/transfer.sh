#!/usr/bin/env bash
# Captions across categories: can a caption the model never saw for a category work? One model of the toy bottle,
# cable and pill (train.py --category bottle,cable,pill, the toy defaults of the time: the UNet attending at levels
# 0 and 1) is asked for the pill's spot defect ("color") in colours the pill's own captions never name but the other
# categories' captions do (green, purple: the bottle's contaminations, the cable's wires), and for reference in the
# pill's own spot colours (red, blue, yellow), on the few-shot spot masks (jittered, as sample.py draws them). A
# caption feature that is a hash of its tokens (the random CLIP) cannot carry "green" from the bottle's captions to
# the pill's; a text encoder that knows the word (the toy CLIP) might. Trained with each CLIP, the same seeds: pairs
# differ in the CLIP alone.
#
#     SEEDS="0 1 2" bash docs/transfer.sh       # 2 runs per seed, each about 40 minutes on one thread
#     bash docs/transfer.sh summary             # the table of the runs finished so far
#
# Per run: runs/transfer/<clip>-s<seed>/ (checkpoints, log.txt) and one sample.py folder per colour under
# samples/transfer/, whose log line ("the colour the caption names is drawn in X of Y") the summary reads.
set -euo pipefail
SEEDS=${SEEDS:-0 1 2} N=${N:-24} EXTRA=${EXTRA:-} SAMPLE_EXTRA=${SAMPLE_EXTRA:-}  # more train.py, sample.py flags
UNSEEN="green purple" OWN="red blue yellow"
[ "${1:-}" = summary ] && SEEDS=
for s in $SEEDS; do for clip in toy random; do
  run=runs/transfer/$clip-s$s
  mkdir -p "$run"
  python train.py --toy --category bottle,cable,pill --out_dir "$run" --seed "$s" --clip "$clip" --unet_attention_levels 0,1 $EXTRA \
    >> "$run/log.txt" 2>&1 || { echo "failed: $run (see $run/log.txt)"; continue; }
  for colour in $UNSEEN $OWN; do
    log=$run/sample-$colour.txt
    grep -q "drawn in" "$log" 2>/dev/null && continue
    python sample.py --toy --category pill --ckpt "$run" --defect color --n "$N" \
      --prompt "A $colour spot is on the pill" --out_dir "samples/transfer/$clip-s$s-$colour/pill" $SAMPLE_EXTRA \
      > "$log" 2>&1 || echo "failed: $log"
  done
  echo "done: $run"
done; done

python - "$UNSEEN" "$OWN" <<'EOF'
"""Each run's share of pill spots drawn in the caption's colour, for the unseen colours and for the pill's own;
each CLIP's mean, sample std and n over seeds, and the paired difference toy - random (docs/compare.py's cells)."""
import re, sys
from pathlib import Path
sys.path.insert(0, "docs")
from compare import cell, difference

def share(run, colours):  # drawn / asked over the colours, or None if a colour's sampling has not finished
    counts = [re.findall(r"drawn in (\d+) of (\d+)", (run / f"sample-{c}.txt").read_text())
              if (run / f"sample-{c}.txt").is_file() else [] for c in colours]
    if not all(counts):
        return None
    return sum(int(found[-1][0]) for found in counts) / sum(int(found[-1][1]) for found in counts)

unseen, own = sys.argv[1].split(), sys.argv[2].split()
runs = {tuple(p.name.rsplit("-s", 1)): p for p in Path("runs/transfer").glob("*-s*")}
print("| colours asked for | random CLIP | toy CLIP | random → toy |\n| --- | --- | --- | --- |")
for name, colours in (("unseen for the pill: " + ", ".join(unseen), unseen), ("the pill's own: " + ", ".join(own), own)):
    value = {key: share(run, colours) for key, run in runs.items()}
    seeds = sorted(s for clip, s in value if clip == "toy" and value["toy", s] is not None
                   and value.get(("random", s)) is not None)
    if not seeds:
        continue
    random, toy = ([value[clip, s] for s in seeds] for clip in ("random", "toy"))
    print(f"| {name} | {cell(random, 100, 1)} | {cell(toy, 100, 1)} | {difference(random, toy, 100, 1)} |")
EOF
