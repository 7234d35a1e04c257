#!/bin/bash
# Peak RSS per rank of LoRA over a 4-bit base at tp=1 and tp=2 (issue 15: a tp rank holds
# about 1/T of the packed base). Llamas of width 1024, MLP 2816, 16 heads, 8 key-value
# heads, vocabulary 32000, untied, with 2 and with 8 layers (35M and 159M parameters),
# written by `flotilla init --quantize 4 --group-size 64` (MLX layout: 4-bit words, f16
# scales and biases), then 3 LoRA steps of 1 row x 32 tokens. What the 6 more layers add
# to a rank's peak is their packed bytes held by that rank, whatever the process and MPI
# cost besides.
#   bench/tp_quantized_memory.sh [BUILD_DIR] [ROUNDS]
# Prints each model's packed bytes on disk and, per run, each rank's peak RSS (MiB,
# /usr/bin/time's %M), ascending.
set -euo pipefail
BUILD=$(realpath "${1:-build}")
ROUNDS=${2:-1}
SOURCE=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cat > "$TMP/config.json" <<'J'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816,
 "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 32000,
 "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false}
J
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
for layers in 2 8; do
  sed "s/\"num_hidden_layers\": 8/\"num_hidden_layers\": $layers/" "$TMP/config.json" > "$TMP/config$layers.json"
  "$BUILD/flotilla" init --config "$TMP/config$layers.json" --out "$TMP/model$layers" --seed 1 --quantize 4 \
    --group-size 64 >/dev/null
  echo "$layers layers: packed base on disk $(du -cb "$TMP/model$layers"/*.safetensors | tail -1 |
    awk '{printf "%.1f MiB", $1/1048576}')"
done
run() {  # tp layers
  local out="$TMP/out" rss="$TMP/rss"
  rm -rf "$out" "$rss"; mkdir -p "$rss"
  echo "load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  local parallel=() launch=()
  if [ "$1" -gt 1 ]; then parallel=(--parallel "tp=$1"); launch=(mpirun --oversubscribe --mca btl self,vader,tcp -np "$1"); fi
  "${launch[@]}" sh -c "exec /usr/bin/time -f %M -o $rss/\${OMPI_COMM_WORLD_RANK:-0} \
    $BUILD/flotilla train --model $TMP/model$2 --data $SOURCE/data/sample/corpus.jsonl --out $out --steps 3 \
    --batch-size 1 --seq-len 32 --seed 1 --fine-tune-type lora --lora-rank 8 ${parallel[*]}" > "$TMP/log" 2>&1 \
    || { tail -5 "$TMP/log"; exit 1; }
  printf 'tp=%s %s layers  peak RSS MiB per rank: %s\n' "$1" "$2" \
    "$(cat "$rss"/* | awk '{printf "%.0f\n", $1/1024}' | sort -n | tr '\n' ' ')"
}
for ((r = 1; r <= ROUNDS; ++r)); do
  for layers in 2 8; do for tp in 1 2; do run "$tp" "$layers"; done; done
done
