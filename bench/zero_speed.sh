#!/bin/bash
# ZeRO-1/2/3 against plain data parallelism (issue 12 item 7): W1 on 2 ranks, 1 thread each,
# the four modes interleaved for ROUNDS rounds; prints each run's median tokens/s and
# per-step phases (steps 3-10), each rank's CPU time (user + system, the whole run), minor
# page faults and voluntary context switches (GNU time), and the load after it. CPU time
# holds better than tokens/s on a loaded machine: it says what a mode costs, not how long
# it waited for a core. FLOTILLA may be several binaries joined by commas (a build before
# and after a change): each round then runs every mode with each, alternated, so that
# their ratios come from one run.
#   [MODES="0 3"] bench/zero_speed.sh FLOTILLA[,FLOTILLA2] [ROUNDS] [-- EXTRA TRAIN FLAGS]   (from the repository root)
set -euo pipefail
IFS=, read -r -a BINS <<< "$1"; R=${2:-2}
shift $(( $# < 2 ? $# : 2 )); [ "${1:-}" = "--" ] && shift
SRC=$(cd "$(dirname "$0")/.." && pwd)
export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
TMP=$(mktemp -d /tmp/flotilla_zero_speed.XXXXXX); trap 'rm -rf "$TMP"' EXIT
cat > "$TMP/config.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 288, "num_hidden_layers": 6,
 "num_attention_heads": 6, "num_key_value_heads": 6, "intermediate_size": 768, "vocab_size": 32000,
 "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false}
JSON
for round in $(seq "$R"); do
 for b in "${!BINS[@]}"; do
  F=$(realpath "${BINS[$b]}"); tag=""; [ "${#BINS[@]}" -gt 1 ] && tag="bin $((b + 1)) "
  for z in ${MODES:-0 1 2 3}; do
    out="$TMP/o_$z"; rm -rf "$out"
    # Each rank under GNU time, into time_Z.RANK.
    mpirun --oversubscribe -np 2 --bind-to none -x TIMES="$TMP/time_$z" \
      bash -c 'exec /usr/bin/time -o "$TIMES.$OMPI_COMM_WORLD_RANK" -f "%U %S %R %w" "$@"' time "$F" train --config "$TMP/config.json" \
      --data "$SRC/data/sample/corpus.jsonl" --batch-size 8 --seq-len 256 --steps 10 --warmup 0 --eval-batches 1 \
      --log-every 1 --out "$out" --zero "$z" --threads 1 "$@" > "$TMP/log_$z" 2>&1 || { echo "zero $z FAILED"; tail -3 "$TMP/log_$z"; }
    /usr/bin/python3 - "$out/metrics.jsonl" "$round" "$z" "$TMP/time_$z" "$tag" <<'PY'
import glob, json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l][2:]
m = lambda k: statistics.median(r[k] for r in rows)
load = open("/proc/loadavg").read().split()[0]
cpu = []
for path in sorted(glob.glob(sys.argv[4] + ".*")):
    user, system, faults, switches = open(path).read().split()[-4:]
    cpu.append(f"{float(user) + float(system):.1f} s {int(faults) // 1000}k {int(switches) // 1000}k vcs")
print(f"round {sys.argv[2]} {sys.argv[5]}zero {sys.argv[3]} tok/s {m('tokens_per_s'):.0f} step {m('step_s'):.3f} "
      f"compute {m('compute_s'):.3f} sync {m('sync_s'):.3f} update {m('update_s'):.3f} "
      f"cpu/faults per rank {', '.join(cpu)} load {load}")
PY
  done
 done
done
