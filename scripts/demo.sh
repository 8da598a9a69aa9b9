#!/usr/bin/env bash
# The main job, end to end on the built-in corpus (the Python standard library; nothing is downloaded):
# corpus as jsonl -> SentencePiece tokenizer -> .bin/.idx -> a small Llama-style GPT trained for a few minutes ->
# loss curve (PNG; validation loss in bits per byte too), a greedy sample, how Python-like the samples are, and
# the commands to go on with. Everything goes to RUN_DIR (default runs/demo), which a rerun replaces.
#
#   bash scripts/demo.sh                        # ~4 minutes on 2 idle CPU cores
#   bash scripts/demo.sh --train-iters 2000     # extra arguments go to pretrain_gpt.py (the last flag wins)
#
# Variables: RUN_DIR, VOCAB_SIZE (2048), DOCUMENTS (all: the first N modules only), SKIP_SETUP=1 (use the
# existing .venv), QUALITY_PROMPTS (8) and SAMPLE_TOKENS (96): the quality measure's size (bench/demo_quality.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
start=$SECONDS
run="${RUN_DIR:-runs/demo}"
vocab="${VOCAB_SIZE:-2048}"
py=.venv/bin/python
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
step() { printf '\n== %s (%d s)\n' "$1" $((SECONDS - start)); }

if [ -e "$run" ] && [ ! -f "$run/.demo" ]; then
  echo "error: RUN_DIR=$run exists and is not a demo folder (no $run/.demo); choose another RUN_DIR" >&2
  exit 2
fi
rm -rf "$run"
mkdir -p "$run/stdlib" "$run/tokenizer"
touch "$run/.demo"
corpus="$run/stdlib/stdlib.jsonl"
tok="$run/tokenizer/stdlib_sp$vocab.model"
data="$run/stdlib/stdlib"  # the folder names the corpus: valid/stdlib/lm_loss

step "1/5 corpus: the standard library's modules, one json line each ({\"text\": ...}, as your own data would be)"
"$py" - "$corpus" "${DOCUMENTS:-0}" <<'EOF'
import itertools, json, sys
from megatron_ext.data.builtin_corpus import iter_documents, stdlib_files
documents = iter_documents(stdlib_files())
with open(sys.argv[1], "w", encoding="utf-8") as f:
    chosen = itertools.islice(documents, int(sys.argv[2])) if int(sys.argv[2]) > 0 else documents
    sizes = [f.write(json.dumps({"text": text}) + "\n") for _, text in chosen]
print(f"{sys.argv[1]}: {len(sizes)} documents, {sum(sizes) / 1e6:.1f} MB")
EOF

step "2/5 tokenizer: SentencePiece BPE, $vocab pieces, byte fallback, newline and indentation as pieces"
"$py" tools/train_tokenizer.py --input "$corpus" --output-prefix "${tok%.model}" --vocab-size "$vocab" \
  --code-layout

step "3/5 preprocess: tokenize into Megatron .bin/.idx"
"$py" tools/preprocess_data.py --input "$corpus" --output-prefix "$data" --tokenizer-type SentencePieceTokenizer \
  --tokenizer-model "$tok" --append-eod --workers "$(nproc)"

# The model and optimizer settings of train_alcf.sh's Llama-style runs (its command is printed at the end).
# The training command goes to $run/pretrain.sh, so resuming is that script plus --load and a longer length.
flags=(--swiglu --normalization RMSNorm --position-embedding-type rope --untie-embeddings-and-output-weights
  --disable-bias-linear --num-layers 4 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 352
  --seq-length 256 --hidden-dropout 0 --attention-dropout 0
  --micro-batch-size 32 --train-iters 400 --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 30
  --weight-decay 0.1 --adam-beta2 0.95 --adam-eps 1e-5 --clip-grad 1.0 --seed 1234
  --data-path "${data}_text_document" --tokenizer-type SentencePieceTokenizer --tokenizer-model "$tok"
  --data-cache-path "$run/cache" --log-interval 10 --eval-interval 50 --eval-iters 4
  --tensorboard-dir "$run/tensorboard" --run-dir "$run" --save "$run/checkpoints" --save-interval 1000 "$@")
printf '#!/usr/bin/env bash\n# The demo'"'"'s training command (scripts/demo.sh); arguments are appended.\n' >"$run/pretrain.sh"
printf 'cd %q\nexec %q pretrain_gpt.py %s "$@"\n' "$root" "$py" "$(printf '%q ' "${flags[@]}")" >>"$run/pretrain.sh"
step "4/5 train: a Llama-style GPT (4 layers, hidden 128), 400 steps of 32 x 256 tokens ($run/pretrain.sh)"
bash "$run/pretrain.sh"

step "5/5 results"
"$py" tools/plot_loss.py "$run"
"$py" bench/demo_quality.py --load "$run/checkpoints" --prompts "${QUALITY_PROMPTS:-8}" \
  --max-new-tokens "${SAMPLE_TOKENS:-96}"
cat <<EOF

== next commands
.venv/bin/python tools/generate.py --load $run/checkpoints --prompt "def main(" --greedy   # or --temperature 0.8
.venv/bin/python tools/inspect_checkpoint.py $run/checkpoints                            # iteration, config, tensors
.venv/bin/python tools/convert_checkpoint.py to-hf --load $run/checkpoints --save $run/hf   # Hugging Face Llama
bash $run/pretrain.sh --load $run/checkpoints --train-iters 3000 --override-opt_param-scheduler
    # resume to 3000 steps (the cosine is stretched to the new length: the LR goes back up first)
NLAYERS=4 HIDDEN=128 HEADS=4 NUM_KV_HEAD=4 FFN_HIDDEN_SIZE=352 SEQ=256 NGPU_PER_HOST=2 MICRO_BATCH=16 LR=3e-3 \\
  MIN_LR=3e-4 TRAIN_ITERS=400 TOKENIZER_TYPE=SentencePieceTokenizer TOKENIZER_MODEL=$tok DATA_CACHE_PATH=$run/cache \\
  EVAL_INTERVAL=50 EVAL_ITERS=4 LOG_INTERVAL=10 SAVE=$run/alcf/checkpoints RUN_DIR=$run/alcf \\
  bash train_alcf.sh --data-path ${data}_text_document --lr-warmup-iters 30${*:+ $(printf '%q ' "$@")}
    # the same run through train_alcf.sh: 2 ranks (torchrun here, mpiexec/srun in a job) x micro-batch 16
EOF
echo "demo finished in $((SECONDS - start)) s (setup not counted); load average now: $(cut -d' ' -f1-3 /proc/loadavg)"
