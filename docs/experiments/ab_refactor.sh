#!/bin/bash
# A/B: old = main before the #15 refactor, new = the refactor; alternating builds, one round each, twice per bench.
OLD=${OLD:?path to the old build's zkv-mlx}; NEW=${NEW:?path to the new build's zkv-mlx}
export ZKV_DATA_DIR=/tmp/ab-data ZKV_CACHE_DIR=/tmp/ab-cache
for bench in "decode --context 2048" "batch --streams 8"; do
  for i in 1 2; do
    for side in OLD NEW; do
      echo "== ${bench%% *} $side $i"; ${!side} bench $bench --json --rounds 1 2>/dev/null | tail -1
    done
  done
done
