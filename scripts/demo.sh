#!/usr/bin/env bash
# The main job: set up (idempotent), then train a small GPT for a few minutes on the built-in corpus
# (the Python standard library, byte-level tokens), evaluating, logging to tensorboard and saving a checkpoint.
# Extra arguments are passed to pretrain_gpt.py (e.g. --train-iters 50).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
run="${RUN_DIR:-runs/demo}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec .venv/bin/python pretrain_gpt.py \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 256 \
  --micro-batch-size 8 --train-iters 200 \
  --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 20 --clip-grad 1.0 \
  --hidden-dropout 0 --attention-dropout 0 \
  --log-interval 20 --eval-interval 100 --eval-iters 4 \
  --data-cache-path data_cache --tensorboard-dir "$run/tensorboard" \
  --save "$run/checkpoints" --save-interval 100 "$@"
