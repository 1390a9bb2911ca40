"""``koff serve``: an OpenAI-compatible HTTP server over an exported folder."""

from __future__ import annotations

import argparse
import ipaddress
import os

from koff.cli.common import UsageError, add_runtime_options, log


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve an exported backbone and its memories over an OpenAI-compatible HTTP API",
        description="Serve /v1/completions, /v1/chat/completions and /v1/models for an exported folder; `model` names "
        "a memory (or 'backbone' for the bare backbone). Concurrent requests, even for different memories, are "
        "batched together. Admin: POST /v1/memories/load {\"path\": ...}, DELETE /v1/memories/NAME.",
    )
    parser.add_argument("export_dir", metavar="EXPORT", help="a `koff export` folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $KOFF_API_KEY, else no key)")
    parser.add_argument("--max-batch", type=int, default=8, help="most requests generated together")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    parser.add_argument("--header-timeout", type=float, default=10.0,
                        help="seconds a connection has to send its request headers (from opening, or from its last "
                        "response) before it is closed")
    parser.add_argument("--body-timeout", type=float, default=30.0,
                        help="seconds a request body has to arrive whole before the request gets 408")
    parser.add_argument("--max-connections", type=int, default=1000,
                        help="open connections beyond this are closed at once (the open-file limit is raised to fit)")
    parser.add_argument("--max-tokens", type=int, default=256, help="completion length when a chat request sets none")
    parser.add_argument("--auto-fallback", metavar="MEMORY", default=None,
                        help="where `model: auto` sends a prompt the router is not confident about (default: the bare "
                        "backbone)")
    parser.add_argument("--backbone-id", default="backbone", help="model id of the bare backbone")
    add_runtime_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from koff.server import create_app
        from koff.server.limits import ConnectionLimits
    except ImportError as err:
        raise UsageError(f"koff serve needs the serve extra ({err.name} is missing): pip install 'koff[serve]'") from err
    from koff.runtime import load

    if args.max_batch < 1 or args.max_body_bytes < 1 or args.max_tokens < 1:
        raise UsageError("--max-batch, --max-body-bytes and --max-tokens must be positive")
    api_key = args.api_key or os.environ.get("KOFF_API_KEY") or None
    if api_key is None and not _loopback(args.host):
        log.warning("serving on %s without an API key: anyone who can reach it can use and change it", args.host)
    try:
        limits = ConnectionLimits(args.header_timeout, args.body_timeout, args.max_connections).fit_descriptors()
    except ValueError as err:
        raise UsageError(f"--header-timeout, --body-timeout, --max-connections: {err}") from err
    runtime = load(args.export_dir, device=args.device, dtype=args.dtype, merge_lora=args.merge_lora,
                   compile=args.compile)
    try:
        app = create_app(runtime, api_key=api_key, max_body_bytes=args.max_body_bytes, max_batch=args.max_batch,
                         batch_wait_ms=args.batch_wait_ms, backbone_id=args.backbone_id,
                         default_max_tokens=args.max_tokens, limits=limits, auto_fallback=args.auto_fallback)
    except ValueError as err:
        raise UsageError(str(err)) from err
    log.info("serving %s (%s + memories: %s) on http://%s:%d", args.export_dir, args.backbone_id,
             ", ".join(runtime.memories) or "none", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if not args.quiet else "warning",
                http=limits.protocol())
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
