#!/usr/bin/env bash
# Round trip: train in C++ and evaluate in Python, then train in Python and evaluate in C++.
#   examples/interop.sh <path to the interop binary> <work dir>
set -euo pipefail
binary=$1
work=$2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$work"
"$binary" train "$work"
/usr/bin/python3 "$here/interop.py" evaluate "$work"
/usr/bin/python3 "$here/interop.py" train "$work"
"$binary" evaluate "$work"
