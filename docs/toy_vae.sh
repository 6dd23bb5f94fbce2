#!/usr/bin/env bash
# The toy preset's defaults on the generator, every module on (the paper's UNet, the toy CLIP), with the shipped toy
# VAE (--vae_weights toy) and captions centred (--center_text True, the default when these runs were made): per
# category and seed s, stage 2 from docs/mask_channel.sh's run of seed s, stage 3 seeded s, trained to 600 steps
# and judged, then resumed to 900 (a resumed run continues the same run: weights, optimiser, EMA, RNG) and judged
# again. Each judged run samples --n N per defect type and is judged by
# evaluate.py --toy (recall, control, the downstream segmenter seeded s). docs/toy_clip.md's runs (NAME=toy_clip in
# docs/table6.sh) are the same at 900 steps with the VAE trained per run.
#
#     SEEDS="0 1" bash docs/toy_vae.sh        # after docs/mask_channel.sh's runs of those seeds
#     bash docs/toy_vae.sh summary             # the paired tables of the runs finished so far
#
# Per run: runs/toy_vae/<category>/all-s<seed>/ (checkpoints, log.txt); results/toy_vae600/ and results/toy_vae/
# <category>-all-s<seed>.json. A finished run is skipped. The summary pairs them for docs/compare.py in
# results/vae_pair (trained: docs/toy_clip.md's run, toy: this one, 900 steps) and results/steps_pair (900, 600).
set -euo pipefail
CATEGORIES=${CATEGORIES:-cable bottle pill} SEEDS=${SEEDS:-0 1} N=${N:-48} BASE=${BASE:-runs/mask_channel}
[ "${1:-}" = summary ] && SEEDS=
for s in $SEEDS; do for c in $CATEGORIES; do
  run=runs/toy_vae/$c/all-s$s
  mkdir -p "$run" results/toy_vae600 results/toy_vae
  cp -n "$BASE/$c/on-s$s/mask_ae.pt" "$run/"
  for steps in 600 900; do
    name=toy_vae; [ $steps = 600 ] && name=toy_vae600
    [ -f "results/$name/$c-all-s$s.json" ] && continue
    { python train.py --toy --category "$c" --out_dir "$run" --seed "$s" --unet_mask_input False --clip toy \
        --unet_attention_levels 0,1 \
        --center_text True --vae_weights toy --steps $steps &&
      python sample.py --toy --category "$c" --ckpt "$run" --n "$N" --out_dir "samples/$name/$c-all-s$s/$c" &&
      python evaluate.py --toy --category "$c" --generated "samples/$name/$c-all-s$s/$c" --methods axf --seeds "$s" \
        --out "results/$name/$c-all-s$s.json"; } >> "$run/log.txt" 2>&1 || { echo "failed: $run ($steps steps)"; break; }
    echo "done: $run, $steps steps"
  done
done; done

pair() {  # pair folder, row, result file, its log: links where docs/compare.py looks for them
  [ -f "$3" ] || return 0
  mkdir -p "results/$1" "runs/$1/$c/$2-s$s"
  ln -sf "$PWD/$3" "results/$1/$c-$2-s$s.json" && cat "$4" > "runs/$1/$c/$2-s$s/log.txt"
}
for f in results/toy_vae/*-all-s*.json; do
  [ -f "$f" ] || continue
  b=$(basename "$f" .json); c=${b%%-*}; s=${b##*-s}; log=runs/toy_vae/$c/all-s$s/log.txt
  pair vae_pair toy "$f" "$log"
  pair vae_pair trained "results/toy_clip/$c-all-s$s.json" "runs/toy_clip/$c/all-s$s/log.txt"
  pair steps_pair 900 "$f" "$log"
  # the 600-step run's part of the log: up to the resume that continued it
  pair steps_pair 600 "results/toy_vae600/$c-all-s$s.json" <(sed '/resuming from .*axf.pt at step 600/q' "$log")
done
python docs/compare.py results/vae_pair trained toy
python docs/compare.py results/steps_pair 900 600
