#!/usr/bin/python3
"""One binary for the whole fleet: the default build runs on a CPU with AVX2 and FMA but no
AVX-512, and gives there the results it gives on this machine.

The older CPU is Debian's qemu-user emulating a Haswell (`qemu-x86_64 -cpu Haswell`, AVX2 and
FMA, no AVX-512); a binary built with -march=native on an AVX-512 machine dies there with an
illegal instruction. Natively the hot kernels run their AVX-512 variant where the CPU has it,
under qemu their AVX2 variant (kernels/dispatch.hpp), so the comparison also checks that the
two variants compute the same thing:

  * `flotilla score` of a tiny random model: every per-token log-probability within 1e-5;
  * a 3-step training run of the tiny preset (same seed): every step's loss within 1e-5;
  * `flotilla doctor` names the CPU features and the kernel variant each run chose: under
    qemu "avx2 fma" and avx2; natively avx512 exactly when the CPU has avx512f;
  * two ranks, one native and one under qemu (one mpirun): doctor warns that they chose
    different kernels, and still exits 0 (same binary, model and data);
  * `--dtype bf16` on the Haswell (no AVX-512: oneDNN has no bf16 matmul there) still runs:
    score and a 1-step training run compute in float32 (score equal to the float32 run's),
    say so in one log line, once; doctor --dtype bf16 says float32 there and bf16 natively
    where the CPU has AVX-512, and the mixed job warns that the ranks' formats differ.

OpenBLAS inside qemu picks its kernel from OPENBLAS_CORETYPE (the environment's, left alone).

Usage: fleet_binary_test.py <path/to/flotilla>
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

QEMU = ["qemu-x86_64", "-cpu", "Haswell"]
TOL = 1e-5


class Failure(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Failure(message)


def run(cmd, env, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout)
    check(proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def losses(out: Path):
    return [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def doctor_row(text: str, with_dtype: bool = False):
    """(kernels, matmul ISA, cpu features) of every rank from doctor's second table, and the
    matrix products' number format before the features when with_dtype."""
    lines = text.splitlines()
    i = next((i for i, l in enumerate(lines) if l.split()[:5] == ["rank", "kernels", "matmul", "dtype", "cpu"]), None)
    check(i is not None, f"doctor printed no table of kernels and CPU features:\n{text}")
    rows = []
    for l in lines[i + 1:]:
        if not l.strip():
            break
        parts = l.split()
        rows.append((parts[1], parts[2], *([parts[3]] if with_dtype else []), " ".join(parts[4:])))
    return rows


FALLBACK = "--dtype bf16: this CPU has no bf16 matrix products"


def main() -> int:
    if platform.machine() != "x86_64":
        print("skipped: not an x86-64 machine")
        return 77
    if shutil.which("qemu-x86_64") is None:
        sys.exit("FAIL: qemu-x86_64 not found (Debian's qemu-user; scripts/setup installs it)")
    flotilla = Path(sys.argv[1]).resolve()
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["OPENBLAS_NUM_THREADS"] = "1"
    root = Path(tempfile.mkdtemp(prefix="flotilla-fleet-"))
    try:
        words = "the fleet sails as one while each ship holds what it must of the model".split()
        corpus = root / "corpus.txt"
        corpus.write_text("\n\n".join(" ".join(words[(i + j) % len(words)] for j in range(30))
                                      for i in range(40)) + "\n")
        model = root / "model"
        run([flotilla, "init", "--preset", "tiny", "--seed", "5", "--out", model], env)
        text = "the fleet sails as one while each ship holds what it must"

        results = {}
        for name, prefix in (("native", []), ("haswell", QEMU)):
            score = json.loads(run([*prefix, flotilla, "score", "--model", model, "--text", text], env).stdout)
            out = root / f"train-{name}"
            run([*prefix, flotilla, "train", "--preset", "tiny", "--seed", "3", "--data", corpus, "--out", out,
                 "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--lr", "0.004", "--warmup", "1",
                 "--eval-batches", "0"], env)
            doctor = doctor_row(run([*prefix, flotilla, "doctor", "--max-bytes", "4096"], env).stdout)
            results[name] = (score["logprobs"], losses(out), doctor)

        # --dtype bf16 where the CPU has no bf16: float32, said once, never a crash.
        host_flags = Path("/proc/cpuinfo").read_text().replace("\n", " ").split()
        host_bf16 = "avx512f" in host_flags  # oneDNN 2.6 has bf16 products from AVX-512 up
        bf16 = run([*QEMU, flotilla, "score", "--model", model, "--text", text, "--dtype", "bf16"], env)
        check(bf16.stderr.count(FALLBACK) == 1, f"score --dtype bf16 under Haswell: log\n{bf16.stderr}")
        s_b = json.loads(bf16.stdout)["logprobs"]
        worst_fallback = max(abs(a - b) for a, b in zip(s_b, results["haswell"][0]))
        check(worst_fallback <= TOL, f"score --dtype bf16 under Haswell is not float32's: {worst_fallback}")
        out = root / "train-haswell-bf16"
        tr = run([*QEMU, flotilla, "train", "--preset", "tiny", "--seed", "3", "--data", corpus, "--out", out,
                  "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "0", "--dtype", "bf16"], env)
        check(tr.stderr.count(FALLBACK) == 1, f"train --dtype bf16 under Haswell: log\n{tr.stderr}")
        check(json.loads((out / "report.json").read_text())["dtype"] == "float32", "train report's dtype under Haswell")
        d_hb = doctor_row(run([*QEMU, flotilla, "doctor", "--max-bytes", "4096", "--dtype", "bf16"], env).stdout, True)
        d_nb = doctor_row(run([flotilla, "doctor", "--max-bytes", "4096", "--dtype", "bf16"], env).stdout, True)
        check(d_hb[0][2] == "float32", f"doctor --dtype bf16 under Haswell: {d_hb}")
        check(d_nb[0][2] == ("bf16" if host_bf16 else "float32"), f"doctor --dtype bf16 natively: {d_nb}")

        (s_n, l_n, d_n), (s_h, l_h, d_h) = results["native"], results["haswell"]
        check(len(s_n) == len(s_h) and len(s_n) > 5, f"score lengths {len(s_n)} vs {len(s_h)}")
        worst_score = max(abs(a - b) for a, b in zip(s_n, s_h))
        check(worst_score <= TOL, f"score: log-probabilities differ by {worst_score} between native and Haswell")
        check(len(l_n) == 3 and len(l_h) == 3, f"losses: {l_n} vs {l_h}, expected 3 steps each")
        worst_loss = max(abs(a - b) for a, b in zip(l_n, l_h))
        check(worst_loss <= TOL, f"train: losses {l_n} (native) vs {l_h} (Haswell) differ by {worst_loss}")

        # oneDNN picks its own kernels at run time too: AVX2 under qemu's Haswell.
        check(d_h == [("avx2", "avx2", "avx2 fma")], f"doctor under qemu Haswell: {d_h}")
        host_avx512 = " avx512f " in " " + Path("/proc/cpuinfo").read_text().replace("\n", " ") + " "
        check(d_n[0][0] == ("avx512" if host_avx512 else "avx2"), f"doctor natively: {d_n}, host avx512f {host_avx512}")
        check(("avx512f" in d_n[0][2].split()) == host_avx512, f"doctor natively: {d_n}")
        check(d_n[0][1].startswith("avx512") == host_avx512, f"doctor natively: oneDNN's ISA {d_n}")

        if shutil.which("mpirun"):
            # qemu-user has no process_vm_readv: OpenMPI's shared-memory transport copies twice.
            mixed = run(["mpirun", "--allow-run-as-root", "--oversubscribe",
                         "--mca", "btl_vader_single_copy_mechanism", "none", "-np", "1", flotilla, "doctor",
                         "--max-bytes", "4096", "--dtype", "bf16", ":", "-np", "1", *QEMU, flotilla, "doctor",
                         "--max-bytes", "4096", "--dtype", "bf16"],
                        env, timeout=240)
            kernels = [k for k, _, _ in doctor_row(mixed.stdout)]
            check(kernels == [d_n[0][0], "avx2"], f"mixed doctor rows: {kernels}\n{mixed.stdout}")
            if host_avx512:
                check("kernels: rank 1 runs the avx2 variant, rank 0 the avx512 variant" in mixed.stderr,
                      f"no warning for ranks with different kernels:\n{mixed.stderr}")
                check("matmul: rank 1 runs oneDNN's avx2 kernels" in mixed.stderr,
                      f"no warning for ranks with different matrix-product kernels:\n{mixed.stderr}")
                check("dtype: rank 1 computes its matrix products in float32, rank 0 in bf16" in mixed.stderr,
                      f"no warning for ranks with different number formats:\n{mixed.stderr}")
        print(f"ok: score differs by at most {worst_score:.2e}, 3-step losses by {worst_loss:.2e} "
              f"(tolerance {TOL}); doctor native {d_n}, Haswell {d_h}")
        return 0
    except Failure as f:
        print(f"FAIL: {f}")
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
