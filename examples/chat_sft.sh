#!/usr/bin/env bash
# Chat fine-tuning: the stories260K llama2.c model learns to answer in the turns of a chat
# template (examples/chat_template.jinja: "User: ..." / "Assistant: ...</s>"), on conversations in
# OpenAI `messages` jsonl or ShareGPT `conversations` json, with fused AdaLomo, the loss on the
# assistant's turns only, conversations packed into rows; then validation loss before and after,
# and a reply to a chat message.
#   examples/chat_sft.sh ../shared/data/chat/alpaca_sharegpt_multiturn.json [runs/chat] [../shared/data/llama2c]
set -euo pipefail
DATA=${1:?conversations: OpenAI messages jsonl or ShareGPT json}
OUT=${2:-runs/chat}
MODEL_DIR=${3:-$(dirname "$0")/../../shared/data/llama2c}
TEMPLATE=$(dirname "$0")/chat_template.jinja
# What every command below reads the data with (stories260K's context is 512 tokens; a longer
# conversation loses its earliest turns).
ROWS=(--format chat --chat-template "$TEMPLATE" --seq-len 512 --truncation-side left)
mkdir -p "$(dirname "$OUT")"

lomo-jax import "$MODEL_DIR/stories260K.bin" "$OUT-base" --tokenizer "$MODEL_DIR/tok512.model"
python - "$DATA" "$OUT-data" <<'PY'
import json, sys, pathlib
from lomo_jax.records import load_records
records, _ = load_records(sys.argv[1])
out = pathlib.Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
cut = int(len(records) * 0.9)
for name, part in (("train", records[:cut]), ("val", records[cut:])):
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
PY
# What training will see: the first rows, the tokens in the loss between « and ».
lomo-jax data --model "$OUT-base" --data "$OUT-data/train.jsonl" "${ROWS[@]}" --pack | head -n 20
lomo-jax eval "$OUT-base" --data "$OUT-data/val.jsonl" "${ROWS[@]}"
lomo-jax train --model "$OUT-base" --data "$OUT-data/train.jsonl" "${ROWS[@]}" --pack \
    --eval-data "$OUT-data/val.jsonl" --eval-every 50 --save-every 50 \
    --optimizer adalomo --lr 5e-3 --schedule cosine --warmup-steps 10 \
    --steps 200 --batch-size 8 --out "$OUT"
lomo-jax eval "$OUT" --data "$OUT-data/val.jsonl" "${ROWS[@]}"
# The run keeps the template it was trained with (chat_template.jinja), so --chat renders with it
# and the reply stops at the EOS that ends an assistant's turn.
lomo-jax generate "$OUT" --chat "Name three colors." --max-new-tokens 60
echo "loss plot: $OUT/loss.png; Hugging Face export: lomo-jax export $OUT $OUT-hf"
