#!/usr/bin/env bash
# Benchmark kkpipe against b3sum, git status, go-task and turbo, side by side in one run (docs/performance.md).
#
#   bench/compare.sh [small|large|shared-large|all] [--runs N] [--contended]
#   python3 bench/stages.py target/release/kkpipe "$WORK"    # no-op cost per stage and per pattern
#
# Everything lives under $WORK (default ${TMPDIR:-/tmp}/kkpipe-bench): the trees (made once by make-tree.py;
# LARGE is 50,000 files and ~1 GB), b3sum (cargo install), and, when they can be installed, go-task (PyPI) and
# turbo (npm). Peers that cannot be installed are skipped, and the script says so.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${WORK:-${TMPDIR:-/tmp}/kkpipe-bench}
mkdir -p "$WORK/bin"
export PATH="$WORK/bin:$WORK/cargo/bin:$WORK/py/bin:$WORK/npm/node_modules/.bin:$PATH"
export PYTHONPATH="$WORK/py${PYTHONPATH:+:$PYTHONPATH}"

(cd "$HERE/.." && cargo build --release --quiet)
command -v b3sum > /dev/null || cargo install --quiet --root "$WORK/cargo" b3sum || echo "bench: b3sum not installed: cold-hash rows skipped" >&2
command -v task > /dev/null || python3 -m pip install --quiet --target "$WORK/py" go-task-bin || echo "bench: go-task not installed: skipped" >&2
command -v turbo > /dev/null || npm install --silent --prefix "$WORK/npm" turbo > /dev/null || echo "bench: turbo not installed: skipped" >&2

{
  echo "date: $(date -u +%FT%TZ)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x$(nproc); $(free -g | awk '/Mem:/{print $2}') GiB; $(uname -r)"
  echo "kkpipe: $("$HERE/../target/release/kkpipe" --version); $(b3sum --version 2>/dev/null || true); $(git --version)"
  echo "go-task: $(task --version 2>/dev/null || echo none); turbo: $(turbo --version 2>/dev/null || echo none)"
} | tee "$WORK/versions.txt"

python3 "$HERE/compare.py" "$HERE/../target/release/kkpipe" "$WORK" "$@"
