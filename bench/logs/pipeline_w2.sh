#!/bin/bash
# W2 tokens/s: dp and pp on one machine, 3 steps each (the first a warm-up).
F=/work/wt/h2/build/flotilla
export OMP_NUM_THREADS=1 OMPI_MCA_btl_vader_single_copy_mechanism=none OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
MPI="mpirun --allow-run-as-root --oversubscribe --mca btl self,vader,tcp"
COMMON="--model /tmp/h2run/w2 --data /work/wt/h2/data/sample/corpus.txt --seq-len 512 --steps 3 --warmup 1 --log-every 1 --eval-every 0 --eval-batches 1"
run() { name=$1; shift; echo "== $name: $*"; uptime; rm -rf /tmp/h2run/w2_$name; "$@" --out /tmp/h2run/w2_$name $COMMON 2>&1 | grep -E "^step|^done|pipeline:"; python3 -c "
import json,statistics; rows=[json.loads(l) for l in open('/tmp/h2run/w2_$name/metrics.jsonl') if l.strip()]
r=[x['tokens_per_s'] for x in rows if 'tokens_per_s' in x][1:]; print('$name median tokens/s (steps 2-3):', statistics.median(r))"; }
run dp2 $MPI -np 2 $F train --parallel dp=2 --batch-size 2
run pp2 $MPI -np 2 $F train --parallel pp=2 --batch-size 4 --micro-batches 4
run dp4 $MPI -np 4 $F train --parallel dp=4 --batch-size 1
run pp4 $MPI -np 4 $F train --parallel pp=4 --batch-size 4 --micro-batches 4
