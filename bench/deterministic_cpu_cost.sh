#!/bin/bash
# CPU seconds (user + sys of every rank) per training step of the W1 shape (dim 288, 6
# layers, vocab 32000; seq 256, 8 rows a step), 1 thread per rank: (a run of 8 steps less a
# run of 2) / 6. On a shared machine this says more than tokens/s, which the other users'
# load moves. The W1 model is made in a temporary folder (flotilla init, seed 1).
# Usage: bench/deterministic_cpu_cost.sh FLOTILLA RANKS [train flags, e.g. --deterministic]
set -euo pipefail
BIN=$1; R=$2; shift 2
SOURCE=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d /tmp/flotilla_cpu_cost_XXXXXX)
trap 'rm -rf "$TMP"' EXIT
cat > "$TMP/w1.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 288, "num_hidden_layers": 6,
 "num_attention_heads": 6, "num_key_value_heads": 6, "intermediate_size": 768, "vocab_size": 32000,
 "tie_word_embeddings": false, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
 "hidden_act": "silu"}
JSON
"$BIN" init --config "$TMP/w1.json" --out "$TMP/w1" --seed 1 >/dev/null
L=(); [ "$R" -gt 1 ] && L=(mpirun --allow-run-as-root --oversubscribe -np "$R")
cpu() {
  rm -rf "$TMP/out"
  /usr/bin/time -f "%U %S" -o "$TMP/time" env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive \
    OMPI_MCA_btl_vader_single_copy_mechanism=none "${L[@]}" "$BIN" train --model "$TMP/w1" \
    --data "$SOURCE/data/sample/corpus.jsonl" --seq-len 256 --warmup 1 --log-every 1 --eval-every 0 \
    --eval-batches 1 --seed 3 --out "$TMP/out" --batch-size $((8 / R)) --steps "$1" "${@:2}" >/dev/null 2>&1
  awk '{print $1 + $2}' "$TMP/time"
}
a=$(cpu 2 "$@"); b=$(cpu 8 "$@")
python3 -c "print(f'{($b - $a) / 6:.3f} cpu-s/step')"
