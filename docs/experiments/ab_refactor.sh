#!/bin/bash
# A/B: old = main before the #15 refactor, new = the refactor; alternating, one round each.
OLD=${OLD:?path to the old build's zkv-mlx}; NEW=${NEW:?path to the new build's zkv-mlx}
export ZKV_DATA_DIR=/tmp/ab-data ZKV_CACHE_DIR=/tmp/ab-cache
for i in 1 2; do
  for side in old new; do
    exe=$OLD; [ $side = new ] && exe=$NEW
    echo "== decode $side $i"; $exe bench decode --json --context 2048 --rounds 1 2>/dev/null | tail -1
  done
done
for i in 1 2; do
  for side in old new; do
    exe=$OLD; [ $side = new ] && exe=$NEW
    echo "== batch $side $i"; $exe bench batch --json --streams 8 --rounds 1 2>/dev/null | tail -1
  done
done
