"""`zkv-mlx stats`: KV cache statistics of a running server (--url), or of this process after --prompt runs."""

from __future__ import annotations

import json

from ..cli_common import open_model
from ..errors import ZkvError


def _from_server(args) -> dict:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(args.url.rstrip("/") + "/v1/kv/stats")
    if args.api_key:
        req.add_header("Authorization", f"Bearer {args.api_key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, ValueError) as e:
        raise ZkvError(f"cannot read stats from {args.url}: {e}; is `zkv-mlx serve` running there?") from None


def run(args) -> int:
    if args.url:
        stats = _from_server(args)
    else:
        model = open_model(args)
        try:
            for p in args.prompt or []:
                model.chat(p, user=args.user, temperature=0, max_tokens=args.max_tokens)
            stats = model.kv_cache_stats()
        finally:
            model.close()
    if args.json:
        print(json.dumps(stats))
        return 0
    per_user = stats.pop("per_user", {})
    groups = stats.pop("groups", [])
    width = max(map(len, stats))
    for k, v in stats.items():
        print(f"{k:<{width}}  {round(v, 4) if isinstance(v, float) else v}")
    for g in groups:  # KV bytes per layer group (full / window W / state)
        kind = g["kind"] if g["window"] is None else f"{g['kind']} {g['window']}"
        print(f"group {kind}: {g['slots']} layers, {g['used_size']} bytes used, {g['cached_size']} cached, "
              f"{g['total_size']} total")
    for u, v in per_user.items():
        print(f"user {u}: {v}")
    return 0
