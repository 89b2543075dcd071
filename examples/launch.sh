#!/usr/bin/env bash
# Starts N local processes of a program with torchrun's environment on 127.0.0.1.
#   examples/launch.sh N program [args...]
# Across hosts, run the program on each host with RANK, WORLD_SIZE, LOCAL_RANK,
# MASTER_ADDR (a host all can reach, where rank 0 runs) and MASTER_PORT set.
set -euo pipefail
n=$1
shift
export WORLD_SIZE=$n MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-$((29500 + RANDOM % 1000))}
pids=()
for ((rank = 0; rank < n; rank++)); do
  RANK=$rank LOCAL_RANK=$rank "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status
