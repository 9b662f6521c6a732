#!/usr/bin/env bash
# Benchmark: the front of a fresh run (venv, flow start, corpus, crawl, filter), commit against commit.
#
#     bash bench/front_of_run.sh OLD_COMMIT NEW_COMMIT [ROUNDS]
#
# For each round and each commit in turn: `git clone` of this repository at the commit into a temporary
# folder, `make run`, stopped (its process group killed) the moment the CLIP stage starts. Prints, per run,
# the seconds to the venv's stamp and to CLIP's start, then each commit's medians. Interleaved, so the
# machine's drift hits both alike. Each clone holds a full venv (about 6 GB) and is removed after its run.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 OLD_COMMIT NEW_COMMIT [ROUNDS]" >&2; exit 2; }
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
rounds=${3:-3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
declare -A venv_s clip_s

one() {   # one() COMMIT -> "venv_seconds clip_seconds"
  local dir="$work/run" log="$work/run.log" t0 venv="" pid
  rm -rf "$dir"; git clone -q "$repo" "$dir"; git -C "$dir" checkout -q "$1"
  t0=$(date +%s.%N)
  (cd "$dir" && exec setsid make run > "$log" 2>&1) &
  pid=$!
  until grep -q "Running stage 'clip'" "$log" 2>/dev/null; do
    sleep 0.5
    [ -n "$venv" ] || [ ! -e "$dir/.venv/.installed" ] || venv=$(echo "$(date +%s.%N) - $t0" | bc)
    kill -0 $pid 2>/dev/null || { echo "make run of $1 ended before CLIP started:" >&2; tail -5 "$log" >&2; exit 1; }
  done
  local clip; clip=$(echo "$(date +%s.%N) - $t0" | bc)
  kill -TERM -- -$pid 2>/dev/null || true; sleep 3; kill -KILL -- -$pid 2>/dev/null || true
  pkill -f "$dir/.venv" 2>/dev/null || true; sleep 1
  rm -rf "$dir"
  printf '%.1f %.1f\n' "$venv" "$clip"
}

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

for r in $(seq "$rounds"); do
  for c in "$1" "$2"; do
    out=$(one "$c")
    read -r v s <<< "$out"
    echo "round $r  $c  venv ${v} s  to CLIP's start ${s} s"
    venv_s[$c]+="$v "; clip_s[$c]+="$s "
  done
done
for c in "$1" "$2"; do
  echo "median  $c  venv $(median ${venv_s[$c]}) s  to CLIP's start $(median ${clip_s[$c]}) s"
done
