#!/usr/bin/env bash
# The README demo: convert the shipped stories260K (llama2.c) to a q8_0 GGUF, predict, finetune a
# LoRA on the shipped Shakespeare sonnets with llama.cpp finetune's own command line, predict again
# with the adapter, and inspect the checkpoint. Everything runs on CPU in a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/demo}
ITERS=${ITERS:-150}
mkdir -p "$OUT"
MODEL="$OUT/stories260K-q8_0.gguf"

echo "== convert stories260K to GGUF (q8_0 where rows allow it)"
python examples/convert_llama2c.py assets/stories260K.bin assets/tok512.model "$MODEL" --type q8_0

echo "== predict with the base model (greedy)"
lorakit predict -m "$MODEL" -p "Once upon a time" -n 40 --temp 0

echo "== finetune a LoRA on shakespeare.txt (llama.cpp finetune flags; resumes from LATEST if present)"
lorakit finetune --model-base "$MODEL" \
  --checkpoint-in "$OUT/chk-lora-stories260K-shakespeare-LATEST.gguf" \
  --checkpoint-out "$OUT/chk-lora-stories260K-shakespeare-ITERATION.gguf" \
  --lora-out "$OUT/lora-stories260K-shakespeare-ITERATION.bin" \
  --train-data assets/shakespeare.txt \
  --save-every 50 --threads 2 --adam-iter "$ITERS" --batch 8 --ctx 64 --use-checkpointing \
  --adam-alpha 0.01 --warmup 10 --seed 1 --log-jsonl "$OUT/train.jsonl"

echo "== predict with the adapter (unmerged, on the quantized base)"
lorakit predict -m "$MODEL" --lora "$OUT/lora-stories260K-shakespeare-LATEST.bin" \
  -p "Once upon a time" -n 40 --temp 0

echo "== inspect the checkpoint"
lorakit inspect "$OUT/chk-lora-stories260K-shakespeare-LATEST.gguf"
