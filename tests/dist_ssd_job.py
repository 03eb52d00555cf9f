"""Each rank's program in test_distributed.py's SSD-tier test: an SSD store per rank, under its own cache dir.

Usage: python dist_ssd_job.py MODEL_DIR OUT_DIR. Rank r's cache dir is OUT_DIR/cache-rank{r}. Rank 0 writes
OUT_DIR/result.json: the prompt's greedy tokens cold, after its blocks were evicted to SSD and promoted, and after
they were evicted again with rank 1's block files corrupted (then recomputed), with the hit tokens and the
per-rank SSD counters of each step.
"""

import json
import os
import sys
from pathlib import Path

import zkv_mlx  # noqa: F401  (OpenBLAS before mlx.core)
from zkv_mlx import ZKV

sys.path.insert(0, str(Path(__file__).parent))
from dist_job import tokens  # noqa: E402

PROMPT = [(7 * i + 3) % 900 + 10 for i in range(50)]  # 3 full blocks of 16, and 2 tokens
SETTINGS = dict(max_context=128, block_size=16, weights_dtype="float32", max_num_seqs=1)
GREEDY = dict(max_tokens=6, temperature=0.0, ignore_eos=True)
BLOCK_BYTES = 4096  # the tiny llama's block on one of 2 ranks: 2 layers x K,V x 1 head x 16 x 16 x float32
POOL_BLOCKS = 24


def evict(m, salt: int) -> None:
    # other users' prompts fill the pool: the prompt's cached blocks are reused (spilled to SSD first)
    for j in range(4):
        tokens(m.submit([(salt * 31 + j * 97 + i) % 900 + 10 for i in range(100)], user="z", **GREEDY))


def counters(m) -> dict:
    s = m.kv_cache_stats()
    return {"hit_tokens": s["hit_tokens"], "ranks": s["ranks"]}


def main() -> int:
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    os.environ["ZKV_CACHE_DIR"] = str(out / f"cache-rank{os.environ['MLX_RANK']}")
    m = ZKV(model_dir, distributed=True, kv_cache_memory=BLOCK_BYTES * POOL_BLOCKS, **SETTINGS)
    res = {"cold": tokens(m.submit(PROMPT, user="a", **GREEDY))}
    evict(m, 1)
    res["before_promote"] = counters(m)
    res["promoted"] = tokens(m.submit(PROMPT, user="a", **GREEDY))
    res["after_promote"] = counters(m)
    evict(m, 2)
    res["before_corrupt"] = counters(m)  # (every rank's queued spills are on disk once stats return)
    bad = sorted((out / "cache-rank1").rglob("*.kvb"))
    for p in bad:
        data = bytearray(p.read_bytes())
        data[-1] ^= 0xFF  # one payload byte: the file's checksum no longer matches
        p.write_bytes(bytes(data))
    res["corrupted_files"] = len(bad)
    res["recomputed"] = tokens(m.submit(PROMPT, user="a", **GREEDY))
    res["after_corrupt"] = counters(m)
    (out / "result.json").write_text(json.dumps(res))
    m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
