#!/usr/bin/env bash
# The recipe for training data, chosen on the validation folder (docs/validation_split.py), never on the test set.
# Per category and generator seed: train.py on the folder, three sample.py candidates, evaluate.py on each at the toy
# preset with 20 segmenter epochs; real, real+crop_paste and real+crop_paste+axf (crop-paste's pool and the generated
# ones) run beside the default candidate (48 per type):
#     J48   sample.py's defaults (a few-shot mask, jittered), --n 48 per defect type   -> row real+axf
#     L48   --masks learned, --n 48                                                   -> row real+axf learned
#     J144  the defaults, --n 144                                                     -> row real+axf 144
#
#     OMP_NUM_THREADS=1 CATEGORIES="bottle cable pill" SEEDS="0 1 2" bash docs/validation_recipe.sh
#     python docs/compare.py --by_seed results/validation_recipe/*-s?.json real              # against the real few
#     python docs/compare.py --by_seed results/validation_recipe/*-s?.json real+crop_paste   # against crop-paste
#     python docs/compare.py --methods results/validation_recipe/*-s?.json real+axf          # candidates, by run
#
# Keep one thread count for all of a table's runs: float sums in another order change a 20-epoch segmenter as much
# as a downstream seed does. Each run's rows are joined into results/validation_recipe/<category>-s<seed>.json.
set -euo pipefail
CATEGORIES=${CATEGORIES:-bottle cable pill} SEEDS=${SEEDS:-0 1 2} DSEEDS=${DSEEDS:-0,1}
R=results/validation_recipe
mkdir -p "$R"
for s in $SEEDS; do for c in $CATEGORIES; do
  [ -d "data/validation/$c" ] || python docs/validation_split.py --category "$c" --toy --out data/validation
  run=runs/validation/$c-s$s
  python train.py --category "$c" --data_root data/validation --preset toy --out_dir "$run" --seed "$s" > "$R/$c-s$s-train.log" 2>&1
  for candidate in J48 L48 J144; do
    out=$R/$c-s$s-$candidate.json
    [ -f "$out" ] && continue
    case $candidate in
      J48) flags="--n 48" methods=real,real+axf,real+crop_paste,real+crop_paste+axf ;;
      L48) flags="--n 48 --masks learned" methods=real+axf ;;
      J144) flags="--n 144" methods=real+axf ;;
    esac
    samples=samples/validation/$c-s$s-$candidate/$c
    python sample.py --category "$c" --data_root data/validation --ckpt "$run" --out_dir "$samples" $flags > "${out%.json}-sample.log" 2>&1
    python evaluate.py --category "$c" --data_root data/validation --preset toy --generated "$samples" --methods "$methods" \
      --seeds "$DSEEDS" --seg_epochs 20 --out "$out" > "${out%.json}.log" 2>&1 || { echo "failed: $out"; continue; }
    echo "done: $out"
  done
  python - "$R" "$c-s$s" <<'EOF'
import json, sys
from pathlib import Path
folder, run = Path(sys.argv[1]), sys.argv[2]
read = lambda candidate: json.loads((folder / f"{run}-{candidate}.json").read_text())
rows = {name: row for name, row in read("J48").items() if name != "protocol"}
rows["real+axf learned"], rows["real+axf 144"] = read("L48")["real+axf"], read("J144")["real+axf"]
(folder / f"{run}.json").write_text(json.dumps(rows, indent=1))
EOF
done; done
