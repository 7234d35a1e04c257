#!/usr/bin/env python3
"""How much of ZeRO-3's gather time a `flotilla train --zero 3 --trace T` hid behind compute.

For each rank's trace (T, T.rank1.json, ...), per step (the first step left out: it pays for
first touches), the mean milliseconds of:
  gather                      the all-gathers on the communication lane ("gather <group>")
  wait gather                 the compute lane's waits for them ("wait for <group> weights")
  reduce-scatter              the gradients' reduce-scatters on the communication lane
  wait for gradient shards    the compute lane's wait for the last ones after backward
  forward, backward, clip + optimizer
and the fraction of gather time hidden: 1 - wait gather / gather.
  bench/zero3_trace_overlap.py TRACE.json [TRACE.rank1.json ...]
"""
import collections
import json
import sys


def summarise(path):
    events = json.load(open(path))
    events = events if isinstance(events, list) else events["traceEvents"]
    events = [e for e in events if e.get("ph") == "X"]
    starts = sorted(e["ts"] for e in events if e["name"] == "forward")
    per_step = collections.defaultdict(lambda: collections.defaultdict(float))
    for e in events:
        step = sum(1 for s in starts if s <= e["ts"]) - 1
        if step < 1:
            continue
        name = e["name"]
        if name.startswith("gather "):
            name = "gather"
        elif name.startswith("wait for ") and name.endswith(" weights"):
            name = "wait gather"
        elif name.startswith("reduce-scatter "):
            name = "reduce-scatter"
        per_step[step][name] += e["dur"] / 1e3
    mean = collections.defaultdict(float)
    for spans in per_step.values():
        for name, ms in spans.items():
            mean[name] += ms / len(per_step)
    keys = ["forward", "backward", "clip + optimizer", "gather", "wait gather", "reduce-scatter",
            "wait for gradient shards"]
    print(f"{path}: {len(per_step)} steps, ms a step: " + ", ".join(f"{k} {mean[k]:.0f}" for k in keys))
    if mean["gather"] > 0:
        print(f"  gather time hidden behind compute: {1 - mean['wait gather'] / mean['gather']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for p in sys.argv[1:]:
        summarise(p)
