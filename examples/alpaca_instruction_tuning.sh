#!/usr/bin/env bash
# Instruction-tune the stories260K llama2.c model on Alpaca data with fused AdaLomo, then compare
# validation loss before and after.
#   examples/alpaca_instruction_tuning.sh ../shared/data/llama2c ../shared/data/alpaca/alpaca_data_1k.json runs/alpaca
set -euo pipefail
MODEL_DIR=${1:?llama2c directory with stories260K.bin and tok512.model}
DATA=${2:?Alpaca json}
OUT=${3:-runs/alpaca}
mkdir -p "$(dirname "$OUT")"

lomo-jax import "$MODEL_DIR/stories260K.bin" "$OUT-base" --tokenizer "$MODEL_DIR/tok512.model"
python - "$DATA" "$OUT-data" <<'PY'
import json, sys, pathlib
records = json.loads(pathlib.Path(sys.argv[1]).read_text())
out = pathlib.Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
cut = int(len(records) * 0.9)
(out / "train.json").write_text(json.dumps(records[:cut]))
(out / "val.json").write_text(json.dumps(records[cut:]))
PY
lomo-jax eval "$OUT-base" --data "$OUT-data/val.json" --format alpaca --seq-len 256
lomo-jax train --model "$OUT-base" --data "$OUT-data/train.json" --format alpaca \
    --eval-data "$OUT-data/val.json" --eval-every 50 --save-every 50 \
    --optimizer adalomo --lr 5e-3 --schedule cosine --warmup-steps 10 \
    --steps 200 --batch-size 8 --seq-len 256 --out "$OUT"
lomo-jax eval "$OUT" --data "$OUT-data/val.json" --format alpaca --seq-len 256
lomo-jax generate "$OUT" --prompt "Once upon a time" --max-new-tokens 60
echo "loss plot: $OUT/loss.png; Hugging Face export: lomo-jax export $OUT $OUT-hf"
