"""`engine serve`: the fal-compatible server under uvicorn.

    engine serve --host 127.0.0.1 --port 8443 --ssl-certfile cert.pem --ssl-keyfile key.pem \\
        --api-key secret --endpoint fal-ai/fast-sdxl=tiny-sdxl

The official client needs https: give a certificate (and trust its CA on the client with SSL_CERT_FILE).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    serve = subparsers.add_parser("serve", help="serve fal's HTTP protocols (run, stream, queue) over this engine")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--ssl-certfile", help="PEM certificate (the fal client always speaks https)")
    serve.add_argument("--ssl-keyfile", help="PEM private key of the certificate")
    serve.add_argument("--api-key", default=os.environ.get("ENGINE_API_KEY"),
                       help="require `Authorization: Key <key>` on every route but /health (default: $ENGINE_API_KEY)")
    serve.add_argument("--endpoint", action="append", default=[], metavar="APP_ID=MODEL",
                       help="serve APP_ID with MODEL instead of configs/endpoints.yaml's choice (repeatable)")
    serve.add_argument("--device", default="auto")
    serve.add_argument("--opt-level", choices=["O0", "O1", "O2", "O3"],
                       help="optimization level (default: O2 on CUDA, O0 elsewhere)")
    serve.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"],
                       help="runtime of the denoiser and VAE decoder (LoRA requests need torch)")
    serve.add_argument("--allow-private-urls", action="store_true",
                       help="let image_url / webhooks reach private, loopback and link-local addresses")
    serve.add_argument("--allow-model", action="append", default=[], metavar="ID",
                       help="allow-list: HTTP callers may name only these models (registry or hub ids; repeatable); "
                            "models mapped with --endpoint are always served")
    serve.add_argument("--allow-hub-downloads", action="store_true",
                       help="let HTTP callers name hub ids that are not in the local HF cache (downloads them); off by "
                            "default: such a request is refused with a 422")
    serve.add_argument("--timeout", type=float, help="per-request limit in seconds (queueing plus running)")
    serve.add_argument("--files-dir", help="where outputs are kept (default: a temporary folder)")
    serve.add_argument("--retention", type=float, default=3600.0,
                       help="seconds results and output files are kept after completion")
    serve.add_argument("--state-dir", help="durable job store (SQLite) and output files: a restarted server serves "
                       "completed results, re-runs queued jobs, reports running ones as interrupted (default: "
                       "$ENGINE_CACHE_DIR/state when ENGINE_CACHE_DIR is set, else a temporary folder)")
    serve.add_argument("--max-jobs", type=int, default=1000, help="finished jobs kept at most (oldest go first)")
    serve.add_argument("--max-result-bytes", type=int, default=1 << 30,
                       help="bytes of kept results plus output files at most (oldest go first)")
    serve.add_argument("--max-upload-bytes", type=int, default=64 * 1024 * 1024,
                       help="largest file the storage routes accept (refused with 413 before it is stored whole)")
    serve.add_argument("--max-uploads-bytes", type=int, default=1 << 30,
                       help="bytes of all live uploads together at most (uploads expire with --retention)")
    serve.add_argument("--public-url", action="append", default=[], metavar="URL",
                       help="a base URL clients reach this server by besides its own (behind a proxy): file URLs "
                            "under it given as inputs are read from the file store, not fetched (repeatable)")
    serve.add_argument("--webhook-attempts", type=int, default=5,
                       help="deliveries of a webhook at most (retried on 408/429/5xx and network errors, back-off "
                            "from 1 s doubling)")
    serve.add_argument("--preload", action="store_true", help="load the text-to-image models of every app first")
    serve.add_argument("--log-level", default="info")
    from ..runtime.planner import add_memory_arguments

    add_memory_arguments(serve)
    from ..scaleout.serve import add_scaleout_arguments

    add_scaleout_arguments(serve)
    serve.set_defaults(func=cmd_serve)
    return serve


def _preload_models(table: Any) -> list[str]:
    """The text-to-image models the endpoint table serves that are available offline (what --preload loads)."""
    from ..endpoints import ENDPOINTS
    from ..loading import available_offline
    from ..registry import find_spec

    models: list[str] = []
    for app_id in ENDPOINTS:
        model = table.model_for(app_id)
        spec = find_spec(model) if model else None
        if spec is not None and spec.family_spec.task == "text-to-image" and available_offline(spec):
            if model not in models:
                log.info("preloading %s for %s", model, app_id)
                models.append(model)
    return models


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        print(f"error: `engine serve` needs the server extra ({e.name} is missing): pip install 'engine[server]'",
              file=sys.stderr)
        return 2
    ranks = os.environ.get("WORLD_SIZE", "1")
    if ranks.isdigit() and int(ranks) > 1:
        print(f"error: `engine serve` does not run under torchrun (WORLD_SIZE={ranks}): every rank would start a "
              "server of its own, while context parallelism needs every rank to run each request in step. For more "
              "GPUs behind one server use `engine serve --replicas N` (CFG-parallel applies inside a replica that "
              "sees 2 GPUs); for one FLUX request across GPUs, `torchrun ... -m engine.cli generate --parallel "
              "context`", file=sys.stderr)
        return 2

    from ..api import Engine
    from ..runtime.planner import engine_memory_kwargs
    from ..endpoints import parse_override
    from ..runtime.files import FileStore
    from .app import create_app

    try:
        overrides = dict(parse_override(text) for text in args.endpoint)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        print("error: --ssl-certfile and --ssl-keyfile go together", file=sys.stderr)
        return 2
    from ..runtime.jobstore import StateDirLockedError, default_state_dir, open_store

    try:  # a named state dir another server holds is an error; the default one falls back to a temporary dir
        state = open_store(args.state_dir or default_state_dir(), explicit=bool(args.state_dir))
    except StateDirLockedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine_kwargs = dict(device=args.device, opt_level=args.opt_level, allow_private_urls=args.allow_private_urls,
                         compile_config={"backend": args.backend} if args.backend else None,
                         **engine_memory_kwargs(args))
    from ..scaleout.serve import wants_replicas

    replicas = wants_replicas(args)
    if replicas:  # the engines run in Ray Serve replicas; this process keeps the one queue and job store
        from ..scaleout.serve import RayMissingError, config_from_args, queue_for_replicas, require_ray, start_replicas

        try:
            require_ray()
            config = config_from_args(args, engine_kwargs)
            if args.preload:
                from ..endpoints import EndpointTable

                config = dataclasses.replace(config, preload=tuple(_preload_models(EndpointTable(overrides))))
        except (RayMissingError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        engine = start_replicas(config)
        queue_for_replicas(engine, config, state, retention_s=args.retention, max_jobs=args.max_jobs,
                           max_bytes=args.max_result_bytes)
    else:
        engine = Engine(**engine_kwargs)
    app = create_app(engine, api_key=args.api_key, allow_private_urls=args.allow_private_urls,
                     endpoint_overrides=overrides, timeout_s=args.timeout, retention_s=args.retention,
                     files=FileStore(args.files_dir, ttl_s=args.retention) if args.files_dir else None,
                     state_dir=state, max_jobs=args.max_jobs, max_bytes=args.max_result_bytes)
    if replicas:  # on uvicorn's shutdown (it re-raises SIGTERM after it, so code after `run` may never run)
        from ..scaleout.serve import stop_replicas

        app.router.on_shutdown.append(stop_replicas)
    # HTTP callers are untrusted (create_app): registry or hub ids only, never local paths.
    app.state.service.allow_models = frozenset(args.allow_model)
    app.state.service.allow_hub_downloads = args.allow_hub_downloads
    app.state.service.files.max_upload_bytes = args.max_upload_bytes
    app.state.service.files.max_uploads_bytes = args.max_uploads_bytes
    app.state.service.webhooks.attempts = max(1, args.webhook_attempts)
    app.state.surface.public_urls = [url.rstrip("/") + "/" for url in args.public_url]
    if args.preload and not replicas:  # replicas preload at start (each its own engine)
        for model in _preload_models(app.state.service.table):
            engine.load(model)
    uvicorn.run(app, host=args.host, port=args.port, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
                log_level=args.log_level, workers=1, timeout_graceful_shutdown=5)
    app.state.service.close(timeout=5.0)  # threads stopped; a durable store keeps queued jobs for the next start
    return 0
