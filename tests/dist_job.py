"""The program each rank runs in tests/test_distributed.py (and rank 0's checks, also run in one process).

Usage: python dist_job.py MODEL_DIR OUT_DIR [SESSION_IN] [--distributed] [--kill-phase | --stop-phase | --abandon]
       [--no-sessions] [--pipeline]
Writes OUT_DIR/result.json (token ids, stats) and OUT_DIR/logits.npz; exports OUT_DIR/session.zkvs.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

import zkv_mlx  # noqa: F401  (OpenBLAS before mlx.core)
from zkv_mlx import ZKV
from zkv_mlx.errors import ZkvError

PROMPTS = [[5, 9, 100, 7, 42, 3, 77, 12, 8, 19, 33, 2, 64, 1000, 31, 6, 4, 250],
           [11, 22, 33, 44, 55, 66, 77, 88, 99, 111],
           [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 312, 313, 314, 315, 316, 317, 318, 319, 320]]
MAX_TOKENS = 8
CHAT = "hello there, how are you today my friend?"
SETTINGS = dict(max_context=256, kv_cache_memory="4MB", block_size=16, weights_dtype="float32")


def tokens(handle) -> list[int]:
    out = []
    for ev in handle:
        if ev.kind == "error":
            raise ev.error
        if ev.token_id is not None:
            out.append(ev.token_id)
    return out


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    model_dir, out = args[0], Path(args[1])
    session_in = args[2] if len(args) > 2 else None
    split = {"distributed_split": "pipeline"} if "--pipeline" in sys.argv else {}
    m = ZKV(model_dir, distributed="--distributed" in sys.argv, **SETTINGS, **split)  # ranks > 0 never return
    greedy = dict(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    res: dict = {}
    # each prompt alone (user "a": cold), then all three in one decode batch (user "b": cold, its own salt)
    res["alone"] = [tokens(m.submit(p, user="a", **greedy)) for p in PROMPTS]
    handles = [m.submit(p, user="b", **greedy) for p in PROMPTS]
    res["batched"] = [tokens(h) for h in handles]
    before = m.kv_cache_stats()["hit_tokens"]
    res["prefix_hit"] = tokens(m.submit(PROMPTS[0], user="a", **greedy))  # its full blocks come from the cache
    res["hit_tokens"] = m.kv_cache_stats()["hit_tokens"] - before
    logits = {"cold": m.next_token_logits(PROMPTS[2], user="c")}
    res["chat"] = m.chat(CHAT, max_tokens=20, temperature=0.0)
    if "--no-sessions" in sys.argv:
        # sessions that cannot be saved in distributed runs yet (sliding-window, hybrid, pipeline) are refused up
        # front: creating or loading one fails before any turn could be lost at save time
        for key, call in (("session_error", lambda: m.create_session("conv")),
                          ("load_error", lambda: m.load_session(session_in))):
            try:
                call()
            except ZkvError as e:
                res[key] = f"{type(e).__name__}: {e}"
        session_in = None
    else:
        s = m.create_session("conv")
        s.chat(CHAT, max_tokens=20, temperature=0.0)
        res["session_tokens"] = s.token_ids
        s.export(out / "session.zkvs")
        logits["own_session"] = m.next_token_logits(s.token_ids)
    if session_in:
        imported = m.load_session(session_in, name="imported")
        before = m.kv_cache_stats()["hit_tokens"]
        logits["imported"] = m.next_token_logits(imported.token_ids)
        res["imported_hit_tokens"] = m.kv_cache_stats()["hit_tokens"] - before
    stats = m.kv_cache_stats()
    res["ranks"] = stats.get("ranks")
    np.savez(out / "logits.npz", **logits)
    (out / "result.json").write_text(json.dumps(res))
    if "--stop-phase" in sys.argv:
        # idle longer than ZKV_DIST_TIMEOUT: the other rank waits for the next plan without a watchdog
        time.sleep(float(__import__("os").environ["ZKV_DIST_TIMEOUT"]) + 1)
        res["after_idle"] = tokens(m.submit(PROMPTS[1], **greedy))
        (out / "result.json").write_text(json.dumps(res))
        # the test stops rank 1 (SIGSTOP: its sockets stay open); the watchdog must end this process
        (out / "ready").write_text("1")
        while not (out / "stopped").exists():
            time.sleep(0.05)
        (out / "t_stop").write_text(str(time.time()))
        tokens(m.submit(PROMPTS[1], **greedy))
        return 0  # not reached: the watchdog exits with code 3
    if "--abandon" in sys.argv:
        # rank 0 ends without closing the job (as after a crash): rank 1 must say so in one line and exit 1
        sys.stderr.flush()
        __import__("os")._exit(0)
    if "--kill-phase" in sys.argv:
        # a session with a turn not saved yet: lost with rank 1, which close() must say in one line
        m.create_session("kept").chat("one more turn", max_tokens=4, temperature=0.0)
        # the test kills rank 1 now; the next request must fail with a clear error, never hang
        (out / "ready").write_text("1")
        while not (out / "killed").exists():
            time.sleep(0.05)
        t = time.perf_counter()
        try:
            tokens(m.submit(PROMPTS[1], **greedy))
            err = None
        except ZkvError as e:
            err = f"{type(e).__name__}: {e}"
        (out / "kill.json").write_text(json.dumps({"error": err, "seconds": time.perf_counter() - t}))
        m.close()  # after the lost rank: no collective (no SSD spill, no session save), no traceback
        return 1 if err else 0
    m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
