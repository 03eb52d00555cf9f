"""The engine's statistics (README, "Cache statistics"): read from each room, assembled in one dict."""

from __future__ import annotations


def engine_stats(eng) -> dict:
    """KV pool and prefix-cache statistics of an `Engine` (called on the engine thread)."""
    b = eng.blocks.stats()
    c = eng.prefix.counters
    bs = eng.blocks.block_size
    running = eng.scheduler.running
    slots = sum(len(s.block_table) for s in running) * bs
    used_slots = sum(min(s.num_tokens, len(s.block_table) * bs) for s in running)
    looked_up = c["hit_tokens"] + c["miss_tokens"]
    ssd = eng.ssd
    groups = layer_groups(eng)
    return {
        "total_size": sum(g["total_size"] for g in groups),
        "used_size": sum(g["used_size"] for g in groups),
        "cached_size": sum(g["cached_size"] for g in groups),
        "groups": groups,
        "block_size": bs,
        "bytes_per_block": eng.bytes_per_block,
        "blocks_total": b.total,
        "blocks_used": b.used,
        "blocks_cached": b.cached_free,
        "blocks_free": b.free,
        "blocks_pinned": len(eng.prefix.preloaded_blocks()),
        "blocks_session": len(eng.sessions.pinned_blocks()),
        **c,
        "hit_rate": (c["hit_tokens"] / looked_up) if looked_up else 0.0,
        "evictions": b.evictions,
        "fragmentation": (1 - used_slots / slots) if slots else 0.0,
        "running": len(running),
        "waiting": len(eng.scheduler.waiting),
        "preemptions": eng.scheduler.num_preemptions,
        "policy": eng.cfg.policy.kind,
        "policy_dropped_blocks": eng.policy_dropped_blocks,
        "sessions_resident": len(eng.sessions.pins),
        "sessions_released": eng.sessions.released,
        "prompt_cache_enabled": eng.cfg.prompt_cache.enabled,
        "ssd_enabled": ssd is not None,
        "ssd_blocks": len(ssd) if ssd is not None else 0,
        "ssd_size": ssd.used_bytes if ssd is not None else 0,
        "ssd_capacity": ssd.capacity if ssd is not None else 0,
        "ssd_spills": ssd.spills if ssd is not None else 0,
        "ssd_promotions": ssd.promotions if ssd is not None else 0,
        "per_user": {u: dict(v) for u, v in eng.prefix.per_user.items()},
        **_ranks(eng),
    }


def _ranks(eng) -> dict:
    # distributed runs (zkv_mlx/distributed): each rank's heads, pool and memory; sizes above are rank 0's
    if not hasattr(eng.runner, "rank_stats"):
        return {}
    ranks = eng.runner.rank_stats()
    for r in ranks:
        r["used_size"] = eng.blocks.stats().used * r["bytes_per_block"]
    return {"world_size": len(ranks), "ranks": ranks}


def block_map(eng) -> list[str]:
    """State of every block: free, used, shared (several users of one block), cached, pinned."""
    return eng.blocks.block_states(eng.prefix.preloaded_blocks() | eng.sessions.pinned_blocks())


def layer_groups(eng) -> list[dict]:
    """KV bytes per layer group: "full" (the logical blocks' pool), one "window" group per sliding window W (its
    own pool of window blocks, engine/window_groups.py) and "state" (per-sequence state caches of running
    sequences: SSM / linear attention, unpaged KV). Each: kind, window, slots, bytes_per_block, blocks_total,
    blocks_used, blocks_cached, total_size, used_size, cached_size (bytes)."""
    b = eng.blocks.stats()
    per = eng.bytes_per_block
    out = [{"kind": "full", "window": None, "slots": eng.kv.n_layers, "bytes_per_block": per,
            "blocks_total": b.total, "blocks_used": b.used, "blocks_cached": b.cached_free,
            "total_size": eng.kv.total_bytes, "used_size": b.used * per, "cached_size": b.cached_free * per}]
    windows = eng.runner.windows
    if windows is not None:
        out += windows.group_stats()
    plan = eng.runner.plan
    if plan.n_state:
        held = sum(c.nbytes for s in eng.scheduler.running for c in (s.state or []))
        out.append({"kind": "state", "window": None, "slots": plan.n_state, "bytes_per_block": 0,
                    "blocks_total": 0, "blocks_used": 0, "blocks_cached": 0, "total_size": held,
                    "used_size": held, "cached_size": 0})
    return out
