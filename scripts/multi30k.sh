#!/usr/bin/env bash
# Reproduce the README's Multi30k table: train en->de and de->en on the vendored
# Multi30k (29,000 pairs), then score the best and the averaged model on test2016,
# greedy and beam 4. Each direction is one fixed recipe of a fixed number of steps
# (so the numbers do not depend on the machine's speed); on the 2-core CPU of the
# README's table each takes under 60 minutes. A killed run resumes where it stopped.
#
#   scripts/multi30k.sh                      # both directions, into runs/multi30k/
#   DIRECTIONS=de-en scripts/multi30k.sh     # one direction
#
# The recipe and the reason for each choice are in the README ("Multi30k results").
set -euo pipefail
OUT=${OUT:-runs/multi30k}
DIRECTIONS=${DIRECTIONS:-"en-de de-en"}
DATA=$(python -c "from transformer.corpora import multi30k_dir; print(multi30k_dir())")

for pair in $DIRECTIONS; do
  src=${pair%-*}; tgt=${pair#*-}; run=$OUT/$pair
  mkdir -p "$run"
  if [ ! -f "$run/train_seconds" ]; then
    start=$(date +%s)
    transformer train --data "$DATA" --src-lang "$src" --tgt-lang "$tgt" --out "$run" --resume \
      --preset small --vocab-size 8000 --dropout 0.1 \
      --max-tokens 2048 --warmup 800 --lr-scale 0.7 --max-steps 3750 \
      --valid-every 250 --valid-bleu-lines 300 --keep-last 5 --seed 1
    echo $(( $(date +%s) - start )) > "$run/train_seconds"
  fi
  # The paper averages the last 5 checkpoints (here: the last 1,000 steps).
  # shellcheck disable=SC2046
  transformer average $(ls -d "$run"/checkpoints/step_* | tail -n 5) --out "$run/averaged"
  for model in best averaged; do
    dir=$run; [ "$model" = averaged ] && dir=$run/averaged
    for beam in 1 4; do
      hyp=$run/test2016.$model.beam$beam.$tgt
      transformer translate --model "$dir" --input "$DATA/test2016.$src" --output "$hyp" --beam "$beam" --alpha 0.6
      transformer evaluate --hyp "$hyp" --ref "$DATA/test2016.$tgt" --json > "$hyp.json"
      echo "$pair $model beam $beam: $(cat "$hyp.json")"
    done
  done
  transformer plot "$run"
done

python "$(dirname "$0")/multi30k_table.py" "$OUT"
