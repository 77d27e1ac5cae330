#!/usr/bin/env python3
"""Time kkpipe against its peers, side by side in one run, on the trees of make-tree.py. Each ratio's two
commands are timed alternately (A, B, A, B, ...), so both see the same machine load.

    compare.py KKPIPE WORK [small|large|shared-large|all] [--runs N] [--contended]

For each tree: kkpipe `status` with an empty cache (cold), with everything fresh (no-op), after touching
every file (mtimes only, as in a fresh CI checkout) and after editing one file; `b3sum` over the same files
(`--num-threads N`, the baseline of issue 11, and one single-threaded process per core); `git status`; and, when installed, go-task and turbo fully cached
reruns. Prints median and min-max wall time, peak RSS (from wait4), and each target ratio of issues 7 and 11.
Each command runs `runs` times after one warm-up; the page cache is warm throughout.

`--contended` measures every large tree twice: quiet, then with one CPU burner (`yes > /dev/null`) per core
running beside both commands of each ratio, as on a shared CI runner.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time

KKPIPE, WORK = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
WHICH = sys.argv[3] if len(sys.argv) > 3 and not sys.argv[3].startswith("-") else "all"
RUNS = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 7
CONTENDED = "--contended" in sys.argv
TOPS = ["kubeone", "kubermatic", "terraform", "flux"]
HERE = os.path.dirname(os.path.abspath(__file__))


def sh(cmd, cwd, check=True):
    return subprocess.run(cmd, shell=True, cwd=cwd, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def timed(cmd, cwd):
    """Wall seconds and peak RSS (MB) of one run of `cmd` (through bash, whose own RSS is small)."""
    start = time.perf_counter()
    p = subprocess.Popen(["bash", "-c", f"exec {cmd}"], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench: `{cmd}` failed in {cwd}: {p.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def measure(name, cmd, cwd, prepare=None, runs=RUNS, against=None):
    """Time `cmd`; with `against` (one (name, cmd, prepare) or a list of them), time all alternately, so that
    a ratio of any two compares runs made under the same machine load."""
    others = [] if against is None else against if isinstance(against, list) else [against]
    jobs = [(name, cmd, prepare)] + others
    for _, c, p in jobs:
        if p:
            sh(p, cwd)
        timed(c, cwd)  # warm-up
    samples = {n: ([], []) for n, _, _ in jobs}
    for _ in range(runs):
        for n, c, p in jobs:
            if p:
                sh(p, cwd)
            w, r = timed(c, cwd)
            samples[n][0].append(w)
            samples[n][1].append(r)
    rows = []
    for n, _, _ in jobs:
        walls, rss = samples[n]
        row = {"name": n, "median": statistics.median(walls), "min": min(walls), "max": max(walls), "rss_mb": max(rss), "runs": runs}
        print(f"  {n:<34} {fmt(row['median']):>9}  ({fmt(row['min'])}-{fmt(row['max'])})  peak {row['rss_mb']:.0f} MB", file=sys.stderr)
        rows.append(row)
    return rows if against else rows[0]


def fmt(s):
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


# `shared-large`: the tree of ../shared/bench/make-tree.sh (another mix of file sizes than make-tree.py's).
SHARED_MAKE_TREE = os.path.join(HERE, "..", "..", "shared", "bench", "make-tree.sh")


def setup_tree(preset):
    tree = os.path.join(WORK, "trees", preset)
    if not os.path.isdir(os.path.join(tree, ".git")):
        os.makedirs(os.path.dirname(tree), exist_ok=True)
        if preset == "shared-large":
            subprocess.run(["bash", SHARED_MAKE_TREE, tree, "large"], check=True)
        else:
            subprocess.run([sys.executable, os.path.join(HERE, "make-tree.py"), tree, preset], check=True)
    shutil.copy(os.path.join(HERE, "pipeline.toml"), os.path.join(tree, "pipeline.toml"))
    with open(os.path.join(tree, ".git", "info", "exclude"), "w") as f:
        f.write("pipeline.toml\n.kkpipe/\nTaskfile.yml\n.task/\nturbo.json\npackage.json\n.turbo/\nnode_modules/\n")
    return tree


def peers(tree, runs):
    rows = []
    # Earlier rows touched and edited files: refresh git's index, as a clean checkout would have it (turbo
    # hashes through git and falls back to hashing every file when the index is stale).
    sh("git update-index -q --refresh", tree, check=False)
    if shutil.which("task"):
        with open(os.path.join(tree, "Taskfile.yml"), "w") as f:
            f.write("version: '3'\ntasks:\n  all:\n    deps: [" + ", ".join(TOPS) + "]\n")
            for t in TOPS:
                f.write(f"  {t}:\n    method: checksum\n    sources: ['{t}/**/*']\n    cmds: ['true']\n")
        sh("task all", tree)
        rows.append(measure("go-task no-op (checksum)", "task all", tree, runs=runs))
    else:
        print("  (go-task not installed: skipped)", file=sys.stderr)
    if shutil.which("turbo"):
        with open(os.path.join(tree, "package.json"), "w") as f:
            json.dump({"name": "bench", "private": True, "packageManager": "npm@10.0.0", "scripts": {"check": "true"}}, f)
        with open(os.path.join(tree, "turbo.json"), "w") as f:
            json.dump({"tasks": {"check": {"inputs": [f"{t}/**" for t in TOPS], "outputs": []}}}, f)
        env = "TURBO_TELEMETRY_DISABLED=1 DO_NOT_TRACK=1 TURBO_NO_UPDATE_NOTIFIER=1"
        sh(f"{env} turbo run check --output-logs=none", tree)
        rows.append(measure("turbo fully cached rerun", f"env {env} turbo run check --output-logs=none", tree, runs=runs))
    else:
        print("  (turbo not installed: skipped)", file=sys.stderr)
    return rows


def bench(preset):
    tree = setup_tree(preset)
    sh("sync", tree)  # a tree just generated is still being written back: that would load the first rows
    runs = RUNS if preset == "small" else max(3, RUNS // 2)
    files = "find " + " ".join(TOPS) + " -type f -print0"
    print(f"\n{preset}: {tree}", file=sys.stderr)
    rows = {}
    k = KKPIPE
    ncpu = os.cpu_count() or 2
    # The baseline: `xargs b3sum --num-threads N`, one process that spreads a big file over the cores
    # but hashes small files one after another. The stricter one: one single-threaded b3sum per core.
    b3 = [(f"b3sum --num-threads {ncpu}", f"bash -c \"{files} | xargs -0 b3sum --num-threads {ncpu} > /dev/null\"", None),
          (f"b3sum, {ncpu} processes", f"bash -c \"{files} | xargs -0 -P{ncpu} -n 1000 b3sum --num-threads 1 > /dev/null\"", None)]
    have_b3 = shutil.which("b3sum") is not None
    if have_b3:
        rows["cold"], rows["b3sum"], rows["b3sum_par"] = measure("kkpipe status, empty cache", f"{k} -q status", tree, "rm -rf .kkpipe", runs, b3)
    else:
        rows["cold"] = measure("kkpipe status, empty cache", f"{k} -q status", tree, prepare="rm -rf .kkpipe", runs=runs)
    sh(f"{k} -q run", tree)
    sh("sleep 2.1", tree)  # let the files' timestamps age past the racy window, then record them
    sh(f"{k} -q status", tree)
    git = ("git status --porcelain", "git status --porcelain", None)
    rows["noop"], rows["git"] = measure("kkpipe status, no-op", f"{k} -q status", tree, runs=runs, against=git)
    touch = f"{files} | xargs -0 touch"
    if have_b3:
        rows["touch"], rows["b3sum_touch"], rows["b3sum_par_touch"] = measure("kkpipe status, every file touched", f"{k} -q status", tree, touch, runs, b3)
    else:
        rows["touch"] = measure("kkpipe status, every file touched", f"{k} -q status", tree, prepare=touch, runs=runs)
    sh("sleep 2.1", tree)
    sh(f"{k} -q run", tree)
    sh(f"{k} -q status", tree)
    one = subprocess.run(f"{files} | head -z -n 1", shell=True, cwd=tree, capture_output=True).stdout.rstrip(b"\0").decode()
    noop = ("kkpipe status, no-op (again)", f"{k} -q status", None)
    rows["edit"], rows["noop2"] = measure("kkpipe status, one file edited", f"{k} -q status", tree,
                                          f"echo edit >> '{one}'", runs, noop)
    for r in peers(tree, runs):
        rows[r["name"]] = r
    return rows


def ratio(a, b):
    return a["median"] / b["median"]


class Burners:
    """One busy process per core for the duration of a `with` block."""

    def __enter__(self):
        self.procs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(os.cpu_count() or 2)]
        return self

    def __exit__(self, *_):
        for p in self.procs:
            p.kill()
            p.wait()


def targets(lines, label, R):
    """The targets of docs/performance.md for one large tree, quiet or contended."""

    def add(figure, target, value, limit):
        ok = "ok" if value <= limit else "MISSED"
        lines.append(f"| {label} | {figure} | {target} | {value:.2f} ({ok}) |")

    add("no-op `status` / `git status`", "<= 1.0", ratio(R["noop"], R["git"]), 1.0)
    if "b3sum" in R:
        # Each against the b3sum runs alternated with it (the same machine load).
        add("cold `status` / `b3sum --num-threads N`", "<= 1.0", ratio(R["cold"], R["b3sum"]), 1.0)
        add("every file touched / `b3sum --num-threads N`", "<= 0.8", ratio(R["touch"], R["b3sum_touch"]), 0.8)
        add("cold `status` / N `b3sum` processes", "(stricter)", ratio(R["cold"], R["b3sum_par"]), 1.0)
        add("every file touched / N `b3sum` processes", "(stricter)", ratio(R["touch"], R["b3sum_par_touch"]), 1.0)
    add("one file edited / no-op", "<= 1.2", ratio(R["edit"], R["noop2"]), 1.2)
    if "turbo fully cached rerun" in R:
        add("no-op / turbo fully cached rerun", "<= 0.2", ratio(R["noop"], R["turbo fully cached rerun"]), 0.2)
    if "go-task no-op (checksum)" in R:
        add("no-op / go-task no-op", "<= 0.3", ratio(R["noop"], R["go-task no-op (checksum)"]), 0.3)
    peak = max(r["rss_mb"] for n, r in R.items() if n in ("cold", "noop", "touch", "edit"))
    lines.append(f"| {label} | peak RSS of kkpipe | <= 150 MB | {peak:.0f} MB ({'ok' if peak <= 150 else 'MISSED'}) |")


def main():
    results = {}
    for preset in (["small", "large", "shared-large"] if WHICH == "all" else [WHICH]):
        results[preset] = bench(preset)
        if CONTENDED and preset != "small":
            with Burners():
                results[f"{preset}, contended"] = bench(preset)
    lines = ["| tree | figure | target | measured |", "|---|---|---|---|"]
    for label, R in results.items():
        if label != "small":
            targets(lines, label, R)
    if "small" in results:
        S = results["small"]
        lines.append(f"| small | no-op `status` / `git status` | <= 3 | {ratio(S['noop'], S['git']):.2f} |")
        lines.append(f"| small | no-op `status` | ~15 ms | {S['noop']['median'] * 1000:.1f} ms |")
    print("\n".join(lines))
    print("\nmedians:")
    for preset, rows in results.items():
        for r in rows.values():
            print(f"  {preset:<22} {r['name']:<34} {fmt(r['median']):>9}  ({fmt(r['min'])}-{fmt(r['max'])}, {r['runs']} runs)  peak {r['rss_mb']:.0f} MB")
    with open(os.path.join(WORK, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


main()
