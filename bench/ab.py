#!/usr/bin/env python3
"""Compare two kkpipe binaries side by side on one tree: cold, no-op and every-file-touched `status`, each
scenario's runs alternated (A, B, A, B, ...) so both binaries see the same machine load. For checking that a
change is faster before measuring it against the peers with compare.sh. Each binary keeps its own `.kkpipe/`
(moved into place, untimed, before each of its runs), so two schema versions can be compared.

    ab.py KKPIPE_A KKPIPE_B TREE [--runs N] [--contended]
"""

import os
import statistics
import subprocess
import sys
import time

A, B, TREE = (os.path.abspath(p) for p in sys.argv[1:4])
RUNS = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 9
FILES = "find kubeone kubermatic terraform flux -type f -print0"


def sh(cmd):
    subprocess.run(cmd, shell=True, cwd=TREE, check=True, stdout=subprocess.DEVNULL)


def timed(cmd):
    start = time.perf_counter()
    p = subprocess.Popen(cmd, shell=True, cwd=TREE, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, cmd
    return time.perf_counter() - start, usage.ru_utime, usage.ru_stime


def cache_of(k):
    return ".kkpipe-A" if k == A else ".kkpipe-B"


def with_cache(k, cmd, time_it=False):
    """Run `cmd` with binary `k`'s own cache in place (moved in and out untimed); with `time_it`, time it."""
    sh(f"rm -rf .kkpipe; if [ -d {cache_of(k)} ]; then mv {cache_of(k)} .kkpipe; fi")
    try:
        return timed(cmd) if time_it else sh(cmd)
    finally:
        sh(f"if [ -d .kkpipe ]; then mv .kkpipe {cache_of(k)}; fi")


def scenario(name, prepare):
    samples = {A: [], B: []}
    for i in range(RUNS + 1):
        for k in (A, B):
            if prepare:
                sh(prepare.replace(".kkpipe", cache_of(k)))
            s = with_cache(k, f"{k} -q status", time_it=True)
            if i:  # the first round is a warm-up
                samples[k].append(s)
    med = {k: [statistics.median(x[j] for x in v) for j in range(3)] for k, v in samples.items()}
    (wa, ua, sa), (wb, ub, sb) = med[A], med[B]
    print(f"{name:<22} A {wa * 1000:7.1f} ms (user {ua * 1000:.0f}, sys {sa * 1000:.0f})   "
          f"B {wb * 1000:7.1f} ms (user {ub * 1000:.0f}, sys {sb * 1000:.0f})   B/A {wb / wa:.3f}")


def main():
    burners = []
    if "--contended" in sys.argv:
        burners = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(os.cpu_count() or 2)]
    try:
        sh("sync")
        scenario("cold", "rm -rf .kkpipe")
        for k in (A, B):
            with_cache(k, f"{k} -q run")
        sh("sleep 2.1")
        for k in (A, B):
            with_cache(k, f"{k} -q status")
        scenario("no-op", None)
        scenario("every file touched", f"{FILES} | xargs -0 touch")
    finally:
        for p in burners:
            p.kill()


main()
