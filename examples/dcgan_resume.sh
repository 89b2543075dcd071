#!/usr/bin/env bash
# Kills the dcgan example with SIGKILL at random points and restarts it each time, until a run
# finishes; its end state must be bitwise the end state of a run that was never interrupted.
#
#   dcgan_resume.sh DCGAN WORKDIR [KILLS] [DCGAN ARGS...]
set -euo pipefail
dcgan=$1 work=$2 kills=${3:-5}
shift $(($# < 3 ? $# : 3))
args=(--steps 150 --save-every 4 --limit 640 --print-steps 1 "$@")
rm -rf "$work"
mkdir -p "$work"

"$dcgan" "${args[@]}" --out "$work/whole" --final "$work/whole.pt" >"$work/whole.log" 2>&1 ||
  { cat "$work/whole.log"; exit 1; }

RANDOM=${DCGAN_RESUME_SEED:-$$}
for ((run = 1; ; ++run)); do
  log="$work/run$run.log"
  "$dcgan" "${args[@]}" --out "$work/killed" --final "$work/killed.pt" >"$log" 2>&1 &
  pid=$!
  if ((run <= kills)); then
    # Kill after a random number of steps of this run (a step line is printed after its save call).
    target=$((1 + RANDOM % 40))
    while kill -0 "$pid" 2>/dev/null && (($(grep -c '^step ' "$log" || true) < target)); do sleep 0.02; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  status=0
  wait "$pid" || status=$?
  last=$(grep '^step ' "$log" | tail -1 || true)
  echo "run $run: exit $status after ${last:-no step} ($(grep -o 'resumed from [^ ]*' "$log" || echo 'a fresh start'))"
  if ((status == 0)); then break; fi
  if ((status != 137)); then cat "$log"; exit 1; fi
done

if cmp "$work/whole.pt" "$work/killed.pt"; then
  echo "dcgan_resume: $((run - 1)) kills, the end state is bitwise the uninterrupted one"
else
  echo "dcgan_resume: the end state differs from the uninterrupted run's" >&2
  exit 1
fi
