#!/usr/bin/env python3
"""Cost per stage and per pattern of a no-op run (docs/performance.md, "Cost per stage").

    stages.py KKPIPE WORK [--runs N]

Builds, under WORK/stages: chains of N one-file stages (N = 10, 100, 1000), each needing the one before, and
1,000 files with 1,000 patterns split over 10 stages, and 1,000 directories read by a chain of 1,000 stages or
by 10 stages; runs each pipeline once, then times no-op `kkpipe run` (everything fresh) and `git status
--porcelain` on the same tree, alternately (the two directory pipelines alternate with each other too). Prints
medians and the growth per stage, so a change that makes a no-op grow faster than linearly shows.
"""

import os
import shutil
import statistics
import subprocess
import sys
import time

KKPIPE, WORK = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
RUNS = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 9


def chain(n, each=lambda i: (f"src/f{i}.txt", f"src/f{i}.txt")):
    """n stages, each needing the one before; `each(i)` gives stage i's input pattern and the file it reads."""
    text, files = [], []
    for i in range(n):
        need = f'needs = ["s{i - 1}"]\n' if i else ""
        pattern, file = each(i)
        text.append(f'[stages.s{i}]\nrun = "true"\ninputs = ["{pattern}"]\n{need}')
        files.append(file)
    return "\n".join(text), files


def spread(n=1000, stages=10, each=lambda i: (f"src/d{i // 100}/f{i % 100}.txt",) * 2):
    """n patterns over `stages` stages; `each(i)` gives pattern i and the file it matches."""
    per = n // stages
    text, files = [], []
    for s in range(stages):
        pats = [each(s * per + i) for i in range(per)]
        quoted = ", ".join(f'"{p}"' for p, _ in pats)
        text.append(f'[stages.p{s}]\nrun = "true"\ninputs = [{quoted}]\n')
        files.extend(f for _, f in pats)
    return "\n".join(text), files


def build(name, pipeline, files):
    root = os.path.join(WORK, "stages", name)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    for f in files:
        path = os.path.join(root, f)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as out:
            out.write(f + "\n")
    with open(os.path.join(root, "pipeline.toml"), "w") as out:
        out.write(pipeline)
    subprocess.run("git init -q && git add -A && git -c user.name=b -c user.email=b@b commit -qm t", shell=True, cwd=root, check=True)
    with open(os.path.join(root, ".git", "info", "exclude"), "w") as out:
        out.write(".kkpipe/\n")
    subprocess.run([KKPIPE, "run", "-q"], cwd=root, check=True, stdout=subprocess.DEVNULL)
    time.sleep(2.5)  # past the stat cache's racy window, then one run to record every file
    subprocess.run([KKPIPE, "run", "-q"], cwd=root, check=True, stdout=subprocess.DEVNULL)
    return root


def timed(cmd, cwd):
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def compare(root):
    kk, git = [], []
    for _ in range(RUNS):
        kk.append(timed([KKPIPE, "run", "-q"], root))
        git.append(timed(["git", "status", "--porcelain"], root))
    return statistics.median(kk), statistics.median(git)


def main():
    rows = []
    for n in (10, 100, 1000):
        text, files = chain(n)
        rows.append((f"{n} stages in a chain", n, *compare(build(f"chain{n}", text, files))))
    text, files = spread()
    rows.append(("1,000 patterns over 10 stages", 10, *compare(build("patterns", text, files))))
    # One directory per stage (`m/mN/**`, one file in each), against the same directories in 10 stages: the
    # two no-op runs alternate, so their ratio sees one machine load.
    text, files = chain(1000, lambda i: (f"m/m{i}/**", f"m/m{i}/f.txt"))
    chained = build("dirchain", text, files)
    text, files = spread(each=lambda i: (f"m/m{i}/**", f"m/m{i}/f.txt"))
    ten = build("dirstages", text, files)
    a, b, git = [], [], []
    for _ in range(RUNS):
        a.append(timed([KKPIPE, "run", "-q"], chained))
        b.append(timed([KKPIPE, "run", "-q"], ten))
        git.append(timed(["git", "status", "--porcelain"], chained))
    a, b, git = statistics.median(a), statistics.median(b), statistics.median(git)
    rows.append(("1,000 directory stages, chained", 1000, a, git))
    rows.append(("the same 1,000 dirs in 10 stages", 10, b, git))
    print(f"{'no-op kkpipe run':<32} {'kkpipe':>9} {'git status':>11} {'per stage':>10}")
    for name, n, kk, git in rows:
        print(f"{name:<32} {kk * 1000:>7.1f}ms {git * 1000:>9.1f}ms {kk * 1000 / n:>8.3f}ms")
    # Issue 20, item 9: what a stage costs beyond its patterns (goal: at most 2.0, and 50 ms).
    print(f"1,000 directory stages / 10 stages (alternated): {a / b:.2f}x")


if __name__ == "__main__":
    main()
