#!/usr/bin/env bash
# Reproduce the README's Multi30k table: train en->de and de->en on the vendored Multi30k
# (29,000 pairs) with the `small-data` recipe, then choose the averaging and the search on the
# validation set, and score on test2016: the best and the averaged model, greedy and beam,
# BLEU and chrF. Both directions train side by side, one CPU core each, each in at most 60
# minutes (--max-minutes 60; 5,500 steps fit on the README's CPU). A killed run resumes.
#
#   scripts/multi30k.sh                      # both directions, into runs/multi30k/
#   DIRECTIONS=de-en scripts/multi30k.sh     # one direction (on all cores)
#   STAGES=train scripts/multi30k.sh         # train only (STAGES="train score" by default)
#
# The recipe, the ablations behind it and the reason for each choice are in the README
# ("Multi30k results"); scripts/multi30k_ablations.py reruns the ablations.
set -euo pipefail
OUT=${OUT:-runs/multi30k}
DIRECTIONS=${DIRECTIONS:-"en-de de-en"}
STAGES=${STAGES:-"train score"}
DATA=${DATA:-$(python -c "from transformer.corpora import multi30k_dir; print(multi30k_dir())")}
SCRIPTS=$(dirname "$0")

train() {  # train PAIR: the recipe, timed
  local src=${1%-*} tgt=${1#*-} run=$OUT/$1
  [ -f "$run/train_seconds" ] && return
  mkdir -p "$OUT"
  local start; start=$(date +%s)
  transformer train --data "$DATA" --src-lang "$src" --tgt-lang "$tgt" --out "$run" --resume \
    --recipe small-data --valid-bleu-lines 300 --no-progress > "$OUT/$1.train.log" 2>&1
  echo $(( $(date +%s) - start )) > "$run/train_seconds"
}

decode() {  # decode PAIR MODEL SPLIT BEAM ALPHA: translate SPLIT, score it, print the JSON's path
  local src=${1%-*} tgt=${1#*-} run=$OUT/$1 hyp
  hyp=$run/$3.$(basename "$2").beam$4.alpha$5.$tgt
  if [ ! -f "$hyp.json" ]; then
    transformer translate --model "$2" --input "$DATA/$3.$src" --output "$hyp" --beam "$4" --alpha "$5" --no-progress
    transformer evaluate --hyp "$hyp" --ref "$DATA/$3.$tgt" --json > "$hyp.json"
  fi
  echo "$hyp.json"
}

score() {  # score PAIR: choose on valid, report test2016
  local run=$OUT/$1
  # Averages of the last checkpoints (250 steps apart): the last 5 and the last 10.
  # shellcheck disable=SC2046
  transformer average $(ls -d "$run"/checkpoints/step_* | tail -n 5) --out "$run/avg5" > /dev/null
  # shellcheck disable=SC2046
  transformer average $(ls -d "$run"/checkpoints/step_* | tail -n 10) --out "$run/avg10" > /dev/null
  for model in "$run" "$run/avg5" "$run/avg10"; do decode "$1" "$model" valid 4 0.6 > /dev/null; done
  local avg; avg=$(python "$SCRIPTS/multi30k_table.py" --pick "$run" valid "avg5 avg10" 4 0.6)
  for alpha in 0.6 1.0; do for beam in 4 8; do decode "$1" "$run/$avg" valid $beam $alpha > /dev/null; done; done
  local search; search=$(python "$SCRIPTS/multi30k_table.py" --pick-search "$run" "$avg")
  echo "$avg" > "$run/chosen"; echo "$search" >> "$run/chosen"
  transformer plot "$run" > /dev/null
  for model in "$run" "$run/$avg"; do
    decode "$1" "$model" test2016 1 0.6 > /dev/null
    decode "$1" "$model" test2016 $search > /dev/null
  done
}

for stage in $STAGES; do
  set -- $DIRECTIONS
  if [ $# -gt 1 ]; then  # side by side, one core each
    pids=()
    for pair in "$@"; do OMP_NUM_THREADS=1 $stage "$pair" & pids+=($!); done
    for pid in "${pids[@]}"; do wait "$pid"; done  # a failed direction fails the script
  else
    $stage "$1"
  fi
done
if [[ " $STAGES " == *" score "* ]]; then python "$SCRIPTS/multi30k_table.py" "$OUT"; fi
