#!/bin/bash
# Peak RSS per rank of dp=2 x tp=2 (4 ranks of this machine) with --zero 0, 1, 2 and 3, and
# of dp=2 x pp=2 with --zero 0 and 1: ZeRO over the mesh's dp group (issue 15 item 2). A
# 32M-parameter Llama (width 512, 8 layers, MLP 1408, vocabulary 8192, untied) from random
# weights, 3 steps of 2 rows x 32 tokens a replica: the state dominates the peak.
#   [TP_ZEROS="0 1 2 3"] [PP_ZEROS="0 1"] bench/zero_mesh_memory.sh [BUILD_DIR] [ROUNDS]
# Prints, per layout and stage, each rank's peak RSS (MiB, /usr/bin/time's %M), ascending.
# World rank 0 also assembles and writes the whole final model: its peak is the largest.
set -euo pipefail
BUILD=$(realpath "${1:-build}")
ROUNDS=${2:-1}
SOURCE=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cat > "$TMP/config.json" <<'J'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512, "intermediate_size": 1408,
 "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 8192,
 "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false}
J
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
run() {  # layout zero
  local out="$TMP/out" rss="$TMP/rss"
  rm -rf "$out" "$rss"; mkdir -p "$rss"
  echo "load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  mpirun --oversubscribe -np 4 sh -c "exec /usr/bin/time -f %M -o $rss/\$OMPI_COMM_WORLD_RANK \
    $BUILD/flotilla train --config $TMP/config.json --data $SOURCE/data/sample/corpus.txt --out $out --steps 3 \
    --batch-size 2 --seq-len 32 --seed 1 --parallel $1 --zero $2 ${3:-}" > "$TMP/log" 2>&1 \
    || { tail -5 "$TMP/log"; exit 1; }
  printf '%-10s --zero %s  peak RSS MiB per rank: %s\n' "$1" "$2" \
    "$(cat "$rss"/* | awk '{printf "%.0f\n", $1/1024}' | sort -n | tr '\n' ' ')"
}
for ((r = 1; r <= ROUNDS; ++r)); do
  for z in ${TP_ZEROS-0 1 2 3}; do run dp=2,tp=2 $z; done
  for z in ${PP_ZEROS-0 1}; do run dp=2,pp=2 $z '--micro-batches 2'; done
done
