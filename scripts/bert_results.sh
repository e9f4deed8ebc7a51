#!/usr/bin/env bash
# The BERT results of the README (issue 33): two tasks from the bundled text (scripts/bert_tasks.py), encoders
# pre-trained with MLM alone and with MLM + NSP, each fine-tuned and probed (encoder frozen), and the
# scikit-learn baseline. About 90 minutes on a 2-core CPU, one job at a time.
#   bash scripts/bert_results.sh OUT
set -euo pipefail
OUT=${1:?usage: bash scripts/bert_results.sh OUT}
python scripts/bert_tasks.py build "$OUT"
python scripts/bert_tasks.py baseline "$OUT" | tee "$OUT/baseline.txt"
PRE="--preset small --layers 2 --max-len 64 --batch-size 128 --max-steps 600 --lr 7e-4 --warmup 100 \
     --decay-steps 600 --valid-every 300 --no-progress --seed 1"
for corpus in m30k shake; do
  vocab=$([ $corpus = m30k ] && echo 8000 || echo 4000)
  for objective in mlm nsp; do
    transformer mlm train --text "$OUT/pretrain/${corpus}_train.txt" --valid "$OUT/pretrain/${corpus}_valid.txt" \
      --out "$OUT/${corpus}_$objective" --vocab-size "$vocab" $PRE $([ $objective = nsp ] && echo --nsp)
  done
done
finetune() {  # NAME PRETRAINED TASK FLAGS...
  local name=$1 pre=$2 task=$3; shift 3
  transformer classify train --model "$OUT/$pre" --train "$OUT/$task/train.tsv" --valid "$OUT/$task/valid.tsv" \
    --out "$OUT/ft_$name" --no-progress --seed 1 "$@"
  for split in valid test; do
    transformer classify evaluate --model "$OUT/ft_$name" --input "$OUT/$task/$split.tsv" --json \
      > "$OUT/ft_$name.$split.json"
  done
}
for objective in mlm nsp; do
  finetune "pairs_$objective" "m30k_$objective" pairs --max-steps 600 --valid-every 200
  finetune "pairs_${objective}_probe" "m30k_$objective" pairs --max-steps 600 --valid-every 200 --freeze-encoder
  finetune "speakers_$objective" "shake_$objective" speakers --epochs 10 --valid-every 50
  finetune "speakers_${objective}_probe" "shake_$objective" speakers --epochs 10 --valid-every 50 --freeze-encoder
done
