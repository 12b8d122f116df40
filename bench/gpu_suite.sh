#!/usr/bin/env bash
# The device suite (bench/gpu_suite.py) from the repository root: bench/gpu_suite.sh [OUT] [more options].
# OUT defaults to $OUT (the folder whose files come back from a lent machine).
set -euo pipefail
out="${1:-${OUT:-}}"
if [ -z "$out" ]; then
  echo "usage: bench/gpu_suite.sh OUT [options]  (or set \$OUT)" >&2
  exit 2
fi
[ $# -gt 0 ] && shift
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python -m bench.gpu_suite --out="$out" "$@"
