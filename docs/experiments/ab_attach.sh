#!/bin/bash
# A/B for issue 16: old = main before the generic model attachment (6b8e530), new = this tree; the bundled model's
# `bench decode --context 2048`, alternating builds, one round each, twice.
OLD=${OLD:?path to the old build's zkv-mlx}; NEW=${NEW:?path to the new build's zkv-mlx}
export ZKV_DATA_DIR=/tmp/ab-data ZKV_CACHE_DIR=/tmp/ab-cache
for i in 1 2; do
  for side in OLD NEW; do
    echo "== decode $side $i"; ${!side} bench decode --context 2048 --json --rounds 1 2>/dev/null | tail -1
  done
done
