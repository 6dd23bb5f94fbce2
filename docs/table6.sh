#!/usr/bin/env bash
# The paper's Table 6 on the toy world: rows of switches (none; text; text + MIF; text + DDF; all), each trained on
# every toy category with several seeds, sampled, and judged by evaluate.py --toy: recall (the few-shot (mask,
# caption) pairs drawn again) and control (captions naming another colour; captions on new masks), the downstream
# segmenter and classifier. Every row runs the paper's UNet (--unet_mask_input False, whatever the default: an
# ablation of conditioning must not hand every row the mask) on the random CLIP (--clip random), the VAE of the
# base run (--vae_weights train) and centred captions (--center_text True: the table began with them) unless EXTRA
# says otherwise.
#
#     JOBS=2 bash docs/table6.sh                       # the whole table, two runs at a time, one thread each
#     CATEGORIES=bottle SEEDS="0 1" bash docs/table6.sh  # one slice of it
#     bash docs/table6.sh summary                      # only the summary of the runs finished so far
#     NAME=toy_clip ROWS="text all" EXTRA="--clip toy" bash docs/table6.sh   # other runs beside the table
#     NAME=toy_vae ROWS=all EXTRA="--clip toy --vae_weights toy" STAGES=mask_ae.pt bash docs/table6.sh
#
# Stages 1 and 2 (the VAE and the mask encoder) do not depend on the switches: seed s takes them from the run
# BASE/<category>/on-s<s> of docs/mask_channel.sh (trained with that seed) or, where that run has none, from
# BASE/<category>/stages-s<s>, trained here once with seed s before the rows (one stage-3 step, never used), so
# that the spread over seeds includes them and every row of a seed shares them (STAGES: the checkpoints copied;
# without vae.pt, a run with --vae_weights toy loads the pretrained VAE instead). The "all" row is that script's
# run without the mask channel (off-s<s>), linked here. A finished run is skipped, so the script resumes where it
# was stopped. Per run: runs/$NAME/<category>/<row>-s<seed>/ (checkpoints, log.txt) and results/$NAME/<category>-<row>-s<seed>.json;
# the summary (docs/compare.py: n, sample std, paired differences of successive rows with 95% intervals):
# results/$NAME/table6.md.
set -euo pipefail
export CATEGORIES=${CATEGORIES:-bottle cable pill}
SEEDS=${SEEDS:-0 1 2}
JOBS=${JOBS:-1}           # runs at a time; with more than one, each gets one thread
export N=${N:-48}         # samples per defect type
export EXTRA=${EXTRA:-}   # more train.py flags, the same for every run
export NAME=${NAME:-table6} ROWS=${ROWS:-none text text+mif text+ddf all} BASE=${BASE:-runs/mask_channel}
export STAGES=${STAGES:-vae.pt mask_ae.pt}

base_of() {   # category seed: the folder whose stages 1 and 2 the rows of this seed copy
  [ -f "$BASE/$1/on-s$2/mask_ae.pt" ] && echo "$BASE/$1/on-s$2" || echo "$BASE/$1/stages-s$2"
}
export -f base_of

train_stages() {   # category seed: stages 1 and 2 alone, where no base run of this seed has them
  local b; b=$(base_of "$1" "$2")
  [ -f "$b/mask_ae.pt" ] && return 0
  mkdir -p "$b"
  python train.py --toy --category "$1" --out_dir "$b" --seed "$2" --vae_weights train --steps 1 \
    --preview_every 1000 > "$b/log.txt" 2>&1 || { echo "failed: $b (see $b/log.txt)"; return 1; }
  echo "stages 1 and 2: $b"
}

one_run() {   # category row seed: train stage 3 (stages 1 and 2 copied from the base), sample, evaluate, each logged
  local c=$1 row=$2 s=$3 switches
  case $row in
    none) switches="--use_text False --use_mif False --use_ddf False" ;;
    text) switches="--use_text True --use_mif False --use_ddf False" ;;
    text+mif) switches="--use_text True --use_mif True --use_ddf False" ;;
    text+ddf) switches="--use_text True --use_mif False --use_ddf True" ;;
    all) switches="--use_text True --use_mif True --use_ddf True" ;;
  esac
  local base; base=$(base_of "$c" "$s")
  local run=runs/$NAME/$c/$row-s$s out=results/$NAME/$c-$row-s$s.json
  [ -f "$out" ] && return 0
  if [ "$row" = all ] && [ -z "$EXTRA" ] && [ -f "results/$(basename "$BASE")/$c-off-s$s.json" ]; then
    mkdir -p "runs/$NAME/$c" "results/$NAME"   # the same run as docs/mask_channel.sh's without the channel
    ln -sfn "$PWD/$BASE/$c/off-s$s" "$run" && ln -sf "$PWD/results/$(basename "$BASE")/$c-off-s$s.json" "$out"
    return 0
  fi
  mkdir -p "$run" "results/$NAME"
  for stage in $STAGES; do cp -n "$base/$stage" "$run/"; done
  { python train.py --toy --category "$c" --out_dir "$run" --seed "$s" --unet_mask_input False --clip random \
      --unet_attention_levels 0,1 \
      --center_text True \
      --vae_weights train $switches $EXTRA &&
    python sample.py --toy --category "$c" --ckpt "$run" --n "$N" --out_dir "samples/$NAME/$c-$row-s$s/$c" &&
    python evaluate.py --toy --category "$c" --generated "samples/$NAME/$c-$row-s$s/$c" --methods axf \
      --seeds "$s" --out "$out"; } > "$run/log.txt" 2>&1 || { echo "failed: $run (see $run/log.txt)"; return 1; }
  echo "done: $run"
}
export -f one_run

threads=(); [ "$JOBS" -gt 1 ] && threads=(OMP_NUM_THREADS=1)   # two OpenMP teams on the same cores: many times slower
if [ "${1:-}" != summary ]; then
  for c in $CATEGORIES; do for s in $SEEDS; do train_stages "$c" "$s" || exit 1; done; done
  for c in $CATEGORIES; do for row in $ROWS; do for s in $SEEDS; do echo "$c $row $s"; done; done; done |
    env "${threads[@]}" xargs -P "$JOBS" -L 1 bash -c 'one_run "$@"' _ || true   # a failed run is named above
fi
python docs/compare.py "results/$NAME" $ROWS | tee "results/$NAME/table6.md"
