#!/usr/bin/env bash
# The paper's Table 6 on the toy world: five rows of switches (none; text; text + MIF; text + DDF; all), each
# trained on every toy category with three seeds of stage 3, sampled, and judged by evaluate.py --toy (the
# caption's colour drawn, the defect type, the downstream segmenter and classifier on held-out real anomalies).
#
#     bash docs/table6.sh                            # the whole table, from the repository's root
#     CATEGORIES=bottle SEEDS="0 1" bash docs/table6.sh  # one slice of it
#     JOBS=2 bash docs/table6.sh                     # two runs at a time, one thread each
#     EXTRA="--steps 2 --vae_steps 2 --mask_steps 2" N=1 bash docs/table6.sh   # a smoke test of the commands
#     bash docs/table6.sh summary                    # only the summary of the runs finished so far
#     NAME=table6_blind EXTRA="--unet_mask_input False" ROWS="none all" bash docs/table6.sh  # after the table:
#                                                    # other runs of some rows, beside it, from its stages 1 and 2
#
# Stages 1 and 2 (the VAE and the mask encoder) do not depend on the switches: each category trains them once,
# in its all-modules seed-0 run, and the other runs start from copies (train.py resumes a finished stage and
# checks only the keys its network depends on). A finished run is skipped, so the script resumes where it was
# stopped. Per run: runs/$NAME/<category>/<row>-s<seed>/ (checkpoints, log.txt) and
# results/$NAME/<category>-<row>-s<seed>.json (.md); the summary: results/$NAME/table6.md, <category>_rows.png.
set -euo pipefail
export CATEGORIES=${CATEGORIES:-cable bottle pill}
SEEDS=${SEEDS:-0 1 2}
JOBS=${JOBS:-1}           # runs at a time; with more than one, each gets one thread
export N=${N:-16}         # samples per defect type
export EXTRA=${EXTRA:-}   # more train.py flags, the same for every run
export NAME=${NAME:-table6} ROWS=${ROWS:-none text text+mif text+ddf all}

one_run() {   # category row seed: train stage 3 (1 and 2 copied), sample, evaluate, each logged
  local c=$1 row=$2 s=$3 switches
  case $row in
    none) switches="--use_text False --use_mif False --use_ddf False" ;;
    text) switches="--use_text True --use_mif False --use_ddf False" ;;
    text+mif) switches="--use_text True --use_mif True --use_ddf False" ;;
    text+ddf) switches="--use_text True --use_mif False --use_ddf True" ;;
    all) switches="--use_text True --use_mif True --use_ddf True" ;;
  esac
  local base=runs/table6/$c/all-s0 run=runs/$NAME/$c/$row-s$s out=results/$NAME/$c-$row-s$s.json
  [ -f "$out" ] && return 0
  mkdir -p "$run" "results/$NAME"
  [ "$run" = "$base" ] || cp -n "$base/vae.pt" "$base/mask_ae.pt" "$run/"
  { python train.py --toy --category "$c" --out_dir "$run" --seed "$s" $switches $EXTRA &&
    python sample.py --toy --category "$c" --ckpt "$run" --n "$N" --out_dir "samples/$NAME/$c-$row-s$s/$c" &&
    python evaluate.py --toy --category "$c" --generated "samples/$NAME/$c-$row-s$s/$c" --methods axf \
      --seeds "$s" --out "$out"; } > "$run/log.txt" 2>&1 || { echo "failed: $run (see $run/log.txt)"; return 1; }
  echo "done: $run"
}
export -f one_run

threads=(); [ "$JOBS" -gt 1 ] && threads=(OMP_NUM_THREADS=1)   # two OpenMP teams on the same cores: many times slower
for c in $([ "${1:-}" = summary ] || echo $CATEGORIES); do
  # stages 1-3 with every module, and the judge of evaluate.py --toy, once per category
  [ "$NAME" != table6 ] || one_run "$c" all 0
  for row in $ROWS; do
    for s in $SEEDS; do echo "$c $row $s"; done
  done | env "${threads[@]}" xargs -P "$JOBS" -L 1 bash -c 'one_run "$@"' _
done

python - <<'EOF'   # mean ± std over seeds, per category and row; what a row costs, from the runs' logs
import json, os, re, statistics
from pathlib import Path
rows, cats, name = os.environ["ROWS"].split(), os.environ["CATEGORIES"].split(), os.environ["NAME"]
cols = [("colour drawn", lambda r: r["toy_checks"]["colour_named_is_drawn"]),
        ("defect type", lambda r: r["toy_checks"]["defect_type_recognised"]),
        ("pixel AP", lambda r: r["axf"]["segmentation"]["pixel_ap"]),
        ("pixel AU-PRO", lambda r: r["axf"]["segmentation"]["pixel_au_pro"]),
        ("image AUROC", lambda r: r["axf"]["segmentation"]["image_auroc"]),
        ("accuracy", lambda r: r["axf"]["classification"]["accuracy"])]
lines = ["| category | row | seeds | " + " | ".join(n for n, _ in cols) + " | conditioning parameters | s per step |",
         "| --- " * (len(cols) + 5) + "|"]
cell = lambda v: f"{100 * statistics.mean(v):.1f} ± {100 * statistics.pstdev(v):.1f}"
for c in cats:
    for row in rows:
        found = sorted(Path(f"results/{name}").glob(f"{c}-{row}-s*.json"))
        if not found:
            continue
        runs = [json.loads(p.read_text()) for p in found]
        logs = [Path(f"runs/{name}/{c}/{p.stem.removeprefix(f'{c}-')}/log.txt").read_text() for p in found]
        params = re.search(r"and ([\d,]+) conditioning parameters", logs[0]).group(1)
        # the median: the seed-0 run of "all" trains alone on every core, the others two at a time
        step = statistics.median(int(m[1]) / int(m[0]) for log in logs
                                 for m in re.findall(r"(\d+) steps, (\d+) s this run", log))
        lines.append(f"| {c} | {row} | {len(runs)} | " + " | ".join(cell([f(r) for r in runs]) for _, f in cols)
                     + f" | {params} | {step:.2f} |")
Path(f"results/{name}/table6.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))

# a picture per category: the first 6 anomalies of its colour-named defect, drawn by each row's seed-0 model
# (the same normal images, masks and captions in every row: sample.py's draws depend on its seed alone)
import textwrap
from PIL import Image, ImageDraw
defect = {"bottle": "contamination", "cable": "cable_swap", "pill": "color"}
for c in cats:
    folders = [Path(f"samples/{name}/{c}-{row}-s0/{c}") for row in rows]
    if not all(f.is_dir() for f in folders):
        continue
    side, stems = 96, [f"{i:03d}" for i in range(6)]
    sheet = Image.new("RGB", (260 + side * len(rows), 20 + side * len(stems)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, row in enumerate(rows):
        draw.text((260 + side * j + 4, 4), row, fill="black")
    for i, stem in enumerate(stems):
        caption = (folders[0] / "prompt" / defect[c] / f"{stem}.txt").read_text().strip()
        draw.multiline_text((4, 20 + side * i + side // 3), textwrap.fill(caption, 40), fill="black")
        for j, folder in enumerate(folders):
            with Image.open(folder / "test" / defect[c] / f"{stem}.png") as im:
                sheet.paste(im.convert("RGB").resize((side, side), Image.NEAREST), (260 + side * j, 20 + side * i))
    sheet.save(f"results/{name}/{c}_rows.png")
    print(f"wrote results/{name}/{c}_rows.png")
EOF
