#!/bin/bash
# W2 tokens/s and per-rank peak RSS: tp=1 (one process, 2 threads), dp=2 and tp=2 (two
# 1-thread processes) on one machine, 3 steps each (the first a warm-up). A new model from
# W2's config: a tp rank draws only its slices (a model directory would be read whole).
F=${F:-build/flotilla}
W=${W:-/tmp/h2tp}
export OMPI_MCA_btl_vader_single_copy_mechanism=none OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
MPI="mpirun --allow-run-as-root --oversubscribe --mca btl self,vader,tcp"
cat > $W/w2.json <<'J'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 12, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false, "initializer_range": 0.02}
J
COMMON="--config $W/w2.json --data data/sample/corpus.txt --seq-len 512 --steps 3 --warmup 1 --log-every 1 --eval-every 0 --eval-batches 1 --seed 3"
TIME="/usr/bin/time -f peak_rss_kib=%M"
run() { name=$1; shift; echo "== $name: $*"; uptime; rm -rf $W/w2_$name; "$@" --out $W/w2_$name $COMMON 2>&1 | grep -E "^step|^done|tensor parallel|peak_rss"; python3 -c "
import json,statistics; rows=[json.loads(l) for l in open('$W/w2_$name/metrics.jsonl') if l.strip()]
r=[x['tokens_per_s'] for x in rows if 'tokens_per_s' in x][1:]; print('$name median tokens/s (steps 2-3):', statistics.median(r))"; }
OMP_NUM_THREADS=2 run tp1 $TIME $F train --batch-size 4
export OMP_NUM_THREADS=1
run dp2 $MPI -np 2 $TIME $F train --parallel dp=2 --batch-size 2
run tp2 $MPI -np 2 $TIME $F train --parallel tp=2 --batch-size 4
