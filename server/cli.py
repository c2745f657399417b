"""The `serve` subcommand: parse, bind the port, load (converting once into the cache), serve until Ctrl-C."""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
from pathlib import Path

from sdxs_edge.errors import SDXSError

API_KEY_ENV = "SDXS_EDGE_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(subparsers) -> None:
    """Register `serve` on the main CLI's subparsers (sets `func`).

    Args:
        subparsers: the object `ArgumentParser.add_subparsers` returned.
    """
    from sdxs_edge.bundle import PRECISIONS, TARGETS

    s = subparsers.add_parser(
        "serve",
        help="local HTTP server: a page for real-time text-to-image and sketch-to-image, OpenAI- and A1111-shaped image routes",
    )
    s.add_argument(
        "models",
        nargs="*",
        metavar="MODEL_OR_BUNDLE",
        help="bundle folders (served as they are) or model folders (converted once into the cache); default: the embedded model, its canny ControlNet and its outline LoRA",
    )
    s.add_argument(
        "--runtime",
        metavar="NAME[,NAME]",
        help="runtime(s) to load each bundle on (default: the one native to its target); several make the page's runtime picker",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    s.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"require `Authorization: Bearer KEY` on every API route (or set ${API_KEY_ENV})",
    )
    s.add_argument(
        "--target",
        choices=TARGETS,
        help="model folders: convert to this target (default: the fastest installed, executorch int8)",
    )
    s.add_argument("--precision", choices=PRECISIONS, help="model folders: convert at this precision (default int8)")
    s.add_argument(
        "--cache",
        type=Path,
        metavar="DIR",
        help="where converted bundles are kept (default $SDXS_EDGE_CACHE or ~/.cache/sdxs-edge)",
    )
    s.add_argument(
        "--queue", type=int, default=16, metavar="N", help="requests that may wait per model before 503 (default 16)"
    )
    s.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds a request may wait and run before 503 (default 30)",
    )
    s.set_defaults(func=cmd_serve)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, so a port in use is one clear error before anything is loaded.

    It is made with an explicit IPPROTO_TCP: asyncio sets TCP_NODELAY only on connections whose socket
    says so, and without it a kept-alive client waits for a delayed ACK between the response's header and
    body writes (Nagle), tens of ms per request."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SDXSError(
            f"cannot listen on {host}:{port}: {e.strerror or e} (is another server using the port? pass --port N)"
        ) from None
    sock.listen(128)
    return sock


def bundle_paths(args: argparse.Namespace, log) -> list[Path]:
    """Bundle folders to load: those given, model folders converted into the cache, or the embedded model's."""
    from server import models

    variants, bundles = [], []
    for m in args.models:
        p = Path(m).expanduser()
        if (p / "manifest.json").is_file():
            bundles.append(p)
        elif (p / "model_index.json").is_file():
            variants.append(models.Variant(p.resolve().name, model=p.resolve()))
        else:
            raise SDXSError(f"{m} is neither a bundle folder (manifest.json) nor a model folder (model_index.json)")
    if not args.models:
        variants = models.default_variants()
    if variants:
        target, precision = models.fastest_target() if args.target is None else (args.target, "int8")
        precision = args.precision or precision
        bundles += models.cached_bundles(variants, args.cache or models.cache_root(), target, precision, log)
    return bundles


def cmd_serve(args: argparse.Namespace) -> int:
    """Handler of `sdxs-edge serve`: serve until Ctrl-C, then close every session."""
    for pkg in ("fastapi", "uvicorn"):
        if importlib.util.find_spec(pkg) is None:
            raise SDXSError(f"`serve` needs {pkg}: pip install 'sdxs-edge[serve]'")
    if args.queue < 1 or args.timeout <= 0:
        raise SDXSError("--queue must be >= 1 and --timeout > 0")
    import uvicorn

    from server.app import Limits, Server, create_app
    from server.models import load_entries, stderr_log

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    sock = bind(args.host, args.port)
    try:
        runtimes_ = [r.strip() for r in args.runtime.split(",") if r.strip()] if args.runtime else None
        entries = load_entries(bundle_paths(args, stderr_log), runtimes_, stderr_log)
        server = Server(entries, Limits(max_queue=args.queue, timeout_s=args.timeout), api_key)
        try:
            config = uvicorn.Config(create_app(server), log_level="warning", timeout_graceful_shutdown=5)
            host, port = sock.getsockname()[:2]
            if args.host not in LOOPBACK:
                stderr_log(
                    f"warning: listening on {args.host}: other machines can reach this server"
                    + ("" if api_key else "; set --api-key")
                )
            shown = f"[{host}]" if ":" in host else host
            print(
                f"sdxs-edge serve: http://{shown}:{port}/  ({len(entries)} model{'s' * (len(entries) > 1)}{', API key required' if api_key else ''}; Ctrl-C stops)",
                flush=True,
            )
            try:
                uvicorn.Server(config).run(sockets=[sock])
            except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled after shutting down: the normal stop
                pass
        finally:
            server.close()
    finally:
        sock.close()
    print("sdxs-edge serve: stopped", flush=True)
    return 0
