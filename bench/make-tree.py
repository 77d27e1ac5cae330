#!/usr/bin/env python3
"""Generate a deterministic KKP-like GitOps tree for kkpipe's benchmark, and commit it to git.

    make-tree.py DEST small     300 text files, ~2 MB (a real KKP repository's size)
    make-tree.py DEST large     50,000 files, ~1 GB: 49,984 text files (~256 MB) and 16 binaries (~768 MB),
                                like a monorepo with vendored charts and air-gap image tarballs

The same preset and seed give byte-identical files. Top directories: kubeone/, kubermatic/,
terraform/{aws,gcp,dns}/, flux/ (and a pipeline.toml for kkpipe; see compare.sh).
"""

import hashlib
import os
import random
import subprocess
import sys

PRESETS = {
    # files, text bytes, binaries, binary bytes
    "small": (300, 2 * 1024 * 1024, 0, 0),
    "large": (50_000, 256 * 1024 * 1024, 16, 768 * 1024 * 1024),
}

AREAS = [
    # directory, share of text files, extensions
    ("kubeone", 0.2, [".yaml", ".yaml", ".md"]),
    ("kubermatic", 0.3, [".yaml", ".yaml", ".tpl", ".json"]),
    ("terraform/aws", 0.1, [".tf", ".tf", ".tfvars"]),
    ("terraform/gcp", 0.08, [".tf", ".tfvars"]),
    ("terraform/dns", 0.07, [".tf"]),
    ("flux", 0.25, [".yaml"]),
]
NAMES = ("cert-manager ingress-nginx velero prometheus grafana loki minio dex keycloak kyverno cilium coredns "
         "thanos promtail seed preset project user datacenter cluster").split()
KEYS = ("apiVersion kind metadata name namespace labels spec replicas image tag resources limits requests "
        "region zone subnet cidr port secret values chart interval path variable default source").split()


def lines(rng, n):
    pool = []
    for _ in range(n):
        pool.append("  " * rng.randrange(4) + rng.choice(KEYS) + ": " + " ".join(rng.choice(KEYS) for _ in range(rng.randrange(1, 5))) + "\n")
    return "".join(pool).encode()


def main():
    dest, preset = sys.argv[1], sys.argv[2]
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 7
    files, text_bytes, nbin, bin_bytes = PRESETS[preset]
    if os.path.exists(dest) and os.listdir(dest):
        sys.exit(f"make-tree: {dest} exists and is not empty")
    os.makedirs(dest, exist_ok=True)
    rng = random.Random(seed)
    pool = lines(rng, 20_000)
    ntext = files - nbin
    # About 25 files per directory, spread over the areas by share.
    dirs = []
    for area, share, exts in AREAS:
        for d in range(max(1, int(ntext * share / 25))):
            depth = rng.randrange(1, 4)
            parts = [f"{rng.choice(NAMES)}-{d:04d}"] + [rng.choice(NAMES) for _ in range(depth - 1)]
            dirs.append((area + "/" + "/".join(parts), exts))
    sizes = [rng.lognormvariate(0, 1) for _ in range(ntext)]
    scale = text_bytes / sum(sizes)
    written = 0
    for i in range(ntext):
        d, exts = dirs[rng.randrange(len(dirs))]
        path = os.path.join(dest, d, f"{rng.choice(NAMES)}-{i:05d}{rng.choice(exts)}")
        size = max(32, int(sizes[i] * scale))
        start = rng.randrange(len(pool) - 1)
        body = (f"# {d} {i}\n".encode() + pool[start:] + pool)[:size]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(body)
        written += len(body)
    weights = [0.2 + (b % 5) for b in range(nbin)]  # 5 MB to 100 MB each
    bsizes = [int(bin_bytes * w / sum(weights)) for w in weights]
    if bsizes:
        bsizes[-1] += bin_bytes - sum(bsizes)
    for b, size in enumerate(bsizes):
        area = AREAS[b % len(AREAS)][0]
        path = os.path.join(dest, area, "airgap", f"images-{b:02d}.tar")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            done = 0
            block = 0
            while done < size:
                n = min(8 << 20, size - done)
                f.write(hashlib.shake_256(f"{seed}/{b}/{block}".encode()).digest(n))
                done += n
                block += 1
        written += size
    env = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.invalid",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.invalid",
               GIT_AUTHOR_DATE="2025-01-01T00:00:00Z", GIT_COMMITTER_DATE="2025-01-01T00:00:00Z")
    git = lambda *a: subprocess.run(["git", "-c", "init.defaultBranch=main", "-c", "core.bigFileThreshold=1m", *a],
                                    cwd=dest, env=env, check=True, stdout=subprocess.DEVNULL)
    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", f"{preset} tree, seed {seed}")
    print(f"make-tree: {files} files, {written / 1e6:.0f} MB in {dest}", file=sys.stderr)


main()
