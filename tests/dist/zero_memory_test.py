#!/usr/bin/python3
"""flotilla plan's predicted peak memory per rank against every rank's measured peak RSS
(issue 12 items 4 and 9), through bench/zero on W1 at 1 and 3 ranks (3: shards that do not
divide evenly; bench/zero --ranks 1,2,3,4 gives the whole table for RESULTS): plain data
parallelism, and --zero 1, 2 and 3 where this flotilla has --zero (a binary without the flag
checks plain alone, and says so). Every rank must lie within 10% of the prediction.

    zero_memory_test.py FLOTILLA [--mpirun MPIRUN] [--ranks 1,3] [--steps 2]
                        [--stages 0,1,2,3] [--shape D,L,H,F,V,T,B] [--start new,float32]

With --shape, a model of that shape instead of W1 (bench/zero's --shape): dist_zero3_build
runs one whose weights outweigh its activations at --zero 3 on 4 ranks, where a rank that
built (or zeroed) the whole model or gradient before sharding would stand far above the
planner's 16Ψ/N + gathered groups + activations. With --start new,float32 each run also
starts from a model directory of float32 weights (`flotilla init`, then `--model`): a ZeRO-3
rank reads only its shard of the files (Llama::load's ranges), so it stays within the same
bound; one that read the whole model (its 4Ψ of arena plus 4Ψ of mapped file pages) would
peak far above it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_util import script_args  # noqa: E402  (next to this file)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "bench", "zero")
TOLERANCE = 0.10


def main() -> int:
    args = script_args((("--ranks",), {"default": "1,3"}),
                       (("--steps",), {"type": int, "default": 2,
                                       "help": "the peak comes in the second step: AdamW's moments are first "
                                               "written by the first update"}),
                       (("--stages",), {"default": "0,1,2,3", "help": "of 0, 1, 2, 3 (0: plain)"}),
                       (("--shape",), {"help": "dim,layers,heads,ffn,vocab,seq,batch instead of W1"}),
                       (("--start",), {"default": "new", "help": "bench/zero's --start: new, float32, bfloat16"}))
    flotilla = os.path.abspath(args.flotilla)
    help_text = subprocess.run([flotilla, "train", "--help"], capture_output=True, text=True).stdout
    has_zero = "--zero" in help_text
    stages = args.stages if has_zero else "0"
    if not has_zero:
        print("note: this flotilla has no --zero: checking plain data parallelism only")
    worlds = [int(n) for n in args.ranks.split(",")]
    with tempfile.TemporaryDirectory(prefix="flotilla_zero_test_") as tmp:
        out = os.path.join(tmp, "zero.json")
        cmd = ["/usr/bin/python3", BENCH, "--build", os.path.dirname(flotilla), "--mpirun", args.mpirun,
               *(["--shape", args.shape] if args.shape else ["--workload", "W1"]), "--ranks", args.ranks, "--stages", stages, "--steps", str(args.steps),
               "--start", args.start, "--json-out", out]
        print(" ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            sys.stdout.write(proc.stderr[-4000:])
            print(f"FAIL: bench/zero exited {proc.returncode}")
            return 1
        report = json.load(open(out))

    failures = []
    seen = {(r["stage"], r["ranks"], r.get("start", "new")) for r in report["results"]}
    for s in report["skipped"]:
        # A flotilla with --zero may refuse it on one process (nothing to shard); on more
        # ranks a refusal is a failure.
        if s["ranks"] > 1:
            failures.append(f"--zero {s['stage']} on {s['ranks']} ranks refused: {s['why']}")
    for stage in [int(s) for s in stages.split(",")]:
        for n in worlds:
            for start in args.start.split(","):
                if (stage, n, start) not in seen and not (stage > 0 and n == 1):
                    failures.append(f"no measurement for stage {stage} on {n} rank(s) starting from {start}")
    for r in report["results"]:
        if r["predicted_peak_bytes"] is None:
            failures.append(f"stage {r['stage']}, {r['ranks']} rank(s): no prediction in plan.json")
            continue
        ratio = r["measured_peak_bytes"] / r["predicted_peak_bytes"]
        if abs(ratio - 1) > TOLERANCE:
            failures.append(f"stage {r['stage']} on {r['ranks']} rank(s) from {r.get('start', 'new')}, rank {r['rank']}: measured "
                            f"{r['measured_peak_bytes'] / 2**20:.0f} MiB, predicted "
                            f"{r['predicted_peak_bytes'] / 2**20:.0f} MiB ({ratio:.3f}x)")
    for f in failures:
        print("FAIL:", f)
    if not failures:
        print(f"PASS: {len(report['results'])} rank measurements within {100 * TOLERANCE:.0f}% of flotilla plan")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
