#!/bin/bash
# A/B of the CPU decode attention (issue #20 item 1): OLD = a commit's zkv_mlx exported to a temp dir (run through
# PYTHONPATH with this venv), NEW = this worktree; alternating, twice. Each run is itself an A/B against mlx-lm's
# contiguous sdpa (python -m zkv_mlx.kernels.decode_bench), so compare the ratios.
#   OLD_COMMIT=99a9ca7 docs/experiments/ab_decode_attention.sh
set -e
ROOT=$(git rev-parse --show-toplevel); PY="$ROOT/.venv/bin/python"
OLD_DIR=$(mktemp -d); git -C "$ROOT" archive "${OLD_COMMIT:?commit to compare with}" zkv_mlx | tar -x -C "$OLD_DIR"
cp "$ROOT/zkv_mlx/kernels/decode_bench.py" "$OLD_DIR/zkv_mlx/kernels/"  # the same bench on the old attention
for i in 1 2; do
  echo "== old $OLD_COMMIT $i"; (cd /tmp && PYTHONPATH="$OLD_DIR" "$PY" -m zkv_mlx.kernels.decode_bench --json --rounds 5 --iters 3)
  echo "== new $(git -C "$ROOT" rev-parse --short HEAD) $i"; "$PY" -m zkv_mlx.kernels.decode_bench --json --rounds 5 --iters 3
done
