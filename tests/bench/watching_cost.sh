#!/usr/bin/env bash
# compare's taskq workload (../shared/peers/taskq_bench.py) on an older revision and on
# this checkout, alternating, in one sitting: what a change costs in throughput and
# lateness. Usage, from the project's root:
#   tests/bench/watching_cost.sh [REV] [ROUNDS]
# REV defaults to 3545a73 (before metrics, events, notifications and the dashboard).
# The old code runs from a temporary worktree through PYTHONPATH, with this venv.
set -euo pipefail
rev=${1:-3545a73}
rounds=${2:-3}
root=$(pwd)
bench=${TASKQ_BENCH:-$root/../shared/peers/taskq_bench.py}
old=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$old/tree" >/dev/null 2>&1 || true; rm -rf "$old"' EXIT
git -C "$root" worktree add -q --detach "$old/tree" "$rev"
printf '#!/bin/sh\nPYTHONPATH=%s exec %s "$@"\n' "$old/tree" "$root/.venv/bin/taskq" > "$old/taskq"
chmod +x "$old/taskq"
cd "$old"  # not the project root: `app` must come from PYTHONPATH for the old side
for round in $(seq "$rounds"); do
  for side in before after; do
    taskq=$root/.venv/bin/taskq
    [ "$side" = before ] && taskq=$old/taskq
    echo "round $round, $side: $("$root/.venv/bin/python" "$bench" --taskq "$taskq" | tail -1)"
    echo "round $round, $side: $("$root/.venv/bin/python" "$bench" --taskq "$taskq" --split | tail -1)"
  done
done
