#!/usr/bin/env bash
# The UNet's mask input channel against the paper's UNet (x_t alone), every module on: the paired comparison
# that decides the default. Per category and seed s, two runs that share their stages 1 and 2 (trained with
# seed s % BASES, so the spread includes the VAE and the mask encoder) and differ only in --unet_mask_input;
# each samples --n N per defect type (the same plan: sample.py's draws depend on the seed alone) and is
# judged by evaluate.py --toy (the downstream segmenter seeded s; the judge shared; recall and control). The random
# CLIP (--clip random), a VAE trained per run (--vae_weights train) and centred captions (--center_text True), as
# every toy figure measured before the toy CLIP, the toy VAE and Eq. (1) as written.
#
#     JOBS=2 bash docs/mask_channel.sh            # 3 categories x 5 seeds x 2 settings, two runs at a time
#     bash docs/mask_channel.sh summary            # the paired table of the runs finished so far
#
# Per run: runs/mask_channel/<category>/<on|off>-s<seed>/ (checkpoints, log.txt), samples/mask_channel/...,
# results/mask_channel/<category>-<on|off>-s<seed>.json. A finished run is skipped: the script resumes.
set -euo pipefail
export CATEGORIES=${CATEGORIES:-bottle cable pill} SEEDS=${SEEDS:-0 1 2 3 4} BASES=${BASES:-2}
JOBS=${JOBS:-1}
export N=${N:-48} EXTRA=${EXTRA:-} NAME=${NAME:-mask_channel}

one_run() {   # category on|off seed
  local c=$1 ch=$2 s=$3 flag
  [ "$ch" = on ] && flag=True || flag=False
  local b=$((s % BASES)) run=runs/$NAME/$c/$ch-s$s out=results/$NAME/$c-$ch-s$s.json
  local base=runs/$NAME/$c/on-s$b
  [ -f "$out" ] && return 0
  mkdir -p "$run" "results/$NAME"
  [ "$run" = "$base" ] || cp -n "$base/vae.pt" "$base/mask_ae.pt" "$run/"
  { python train.py --toy --category "$c" --out_dir "$run" --seed "$s" --unet_mask_input $flag --clip random \
      --unet_attention_levels 0,1 \
      --center_text True \
      --vae_weights train $EXTRA &&
    python sample.py --toy --category "$c" --ckpt "$run" --n "$N" --out_dir "samples/$NAME/$c-$ch-s$s/$c" &&
    python evaluate.py --toy --category "$c" --generated "samples/$NAME/$c-$ch-s$s/$c" --methods axf \
      --seeds "$s" --out "$out"; } > "$run/log.txt" 2>&1 || { echo "failed: $run (see $run/log.txt)"; return 1; }
  echo "done: $run"
}
export -f one_run

threads=(); [ "$JOBS" -gt 1 ] && threads=(OMP_NUM_THREADS=1)
if [ "${1:-}" != summary ]; then
  python -c "import sys, toy; [toy.ensure_toy(c) for c in sys.argv[1:]]" $CATEGORIES   # made once, before runs share it
  # first the runs that train stages 1 and 2 (seeds 0 .. BASES-1 with the channel), then the rest
  for c in $CATEGORIES; do for s in $SEEDS; do [ "$s" -lt "$BASES" ] && echo "$c on $s"; done; done |
    env "${threads[@]}" xargs -P "$JOBS" -L 1 bash -c 'one_run "$@"' _ || true   # a failed run is named; the rest go on
  for c in $CATEGORIES; do for s in $SEEDS; do for ch in on off; do
    [ "$ch" = on ] && [ "$s" -lt "$BASES" ] || echo "$c $ch $s"; done; done; done |
    env "${threads[@]}" xargs -P "$JOBS" -L 1 bash -c 'one_run "$@"' _ || true
fi
python docs/compare.py "results/$NAME" on off
