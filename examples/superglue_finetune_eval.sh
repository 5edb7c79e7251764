#!/usr/bin/env bash
# The LOMO paper's SuperGLUE setup on a small scale: fine-tune stories260K on 1000 training
# examples of a task with fused LOMO (lr 0.03, grad-norm clip 1.0, linear schedule, warmup 10%,
# batch 16) and report multiple-choice accuracy on the validation set before and after.
#   examples/superglue_finetune_eval.sh ../shared/data/llama2c ../shared/data/superglue/RTE/train.jsonl \
#       ../shared/data/superglue/RTE/val.jsonl rte runs/rte
set -euo pipefail
MODEL_DIR=${1:?llama2c directory with stories260K.bin and tok512.model}
TRAIN=${2:?task training jsonl}
VAL=${3:?task validation jsonl}
TASK=${4:?copa, rte, cb, boolq, wic, wsc or multirc}
OUT=${5:-runs/$TASK}
mkdir -p "$(dirname "$OUT")"

lomo-jax import "$MODEL_DIR/stories260K.bin" "$OUT-base" --tokenizer "$MODEL_DIR/tok512.model"
head -n 1000 "$TRAIN" > "$OUT-train.jsonl"
lomo-jax eval "$OUT-base" --task "$TASK" --data "$VAL"
lomo-jax train --model "$OUT-base" --data "$OUT-train.jsonl" --format superglue --task "$TASK" \
    --optimizer lomo --lr 0.03 --clip-grad-norm 1.0 --schedule linear --warmup-steps 19 \
    --steps 190 --batch-size 16 --seq-len 128 --truncation-side left --out "$OUT"   # ~3-5 min on 2 CPU cores
lomo-jax eval "$OUT" --task "$TASK" --data "$VAL"
