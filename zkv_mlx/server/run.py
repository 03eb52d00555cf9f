"""`zkv-mlx serve`: load the model, build the app, run uvicorn until Ctrl-C."""

from __future__ import annotations

import sys

from ..errors import ConfigError


def serve(args) -> int:
    """Runs the server for parsed `zkv-mlx serve` arguments (see cli.py)."""
    import uvicorn

    from ..cli_common import open_model
    from .app import create_app
    from .auth import load_api_keys
    from ..config import parse_size
    from .guard import check_host_name, is_loopback, normalize_origin

    if args.require_key and not args.api_keys:
        raise ConfigError("--require-key needs --api-keys FILE (no key could ever be accepted)")
    if args.max_queue < 1:
        raise ConfigError(f"--max-queue {args.max_queue}: must be >= 1")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be in 0..65535")
    keys = load_api_keys(args.api_keys) if args.api_keys else None  # before the (slow) model load
    # A loopback server answers only to loopback names (DNS rebinding); on the network, Host is whatever
    # name clients use, so there the API key is the guard.
    hosts = list(args.allow_host) if is_loopback(args.host) else ["*"]
    guard = dict(allowed_hosts=hosts, allowed_origins=args.allow_origin, max_body=args.max_body,
                 max_upload=args.max_upload)
    for url in args.allow_origin:  # bad flags fail before the (slow) model load
        normalize_origin(url)
    for name in args.allow_host:
        check_host_name(name)
    _check_port_free(args.host, args.port)
    parse_size(args.max_body, "--max-body"), parse_size(args.max_upload, "--max-upload")
    model = open_model(args)
    try:
        app = create_app(model, api_keys=keys, require_key=args.require_key, max_queue=args.max_queue, **guard)
        auth = f"{len(keys)} API key(s){', required' if args.require_key else ''}" if keys else "no API keys"
        print(f"zkv-mlx: serving {model.info['model']} on http://{args.host}:{args.port}/v1 ({auth})",
              file=sys.stderr, flush=True)
        # On Ctrl-C, streams still open get a few seconds, then the engine stops and ends them.
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        model.close()
    return 0



def _check_port_free(host: str, port: int) -> None:
    """Raises ConfigError when `host:port` cannot be bound (before the model load, not after it)."""
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r}: cannot resolve it ({e.strerror}); use e.g. 127.0.0.1") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); another server may "
                              f"be using it: pick another, e.g. --port {port + 1}") from None
