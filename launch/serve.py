"""Serve a checkpoint from a pool of replicas behind one HTTP server:

    python -m launch.serve checkpoint=RUN_DIR inference.replicas=2 [inference.port=8000] [address=HOST:PORT]

OpenAI-style POST /v1/completions and /v1/chat/completions, GET /v1/models, POST /tokenize and
/detokenize, GET /openapi.json, /health and /metrics. Binds to 127.0.0.1 unless inference.host
says otherwise (then inference.token or FORGELINE_SERVE_TOKEN is required); the embedded Ray
cluster binds to 127.0.0.1 too.
"""
from __future__ import annotations

import sys

from orchestrator.errors import ConfigError


def main(argv: list[str] | None = None) -> None:
    import logging

    from orchestrator.inference.config import compose

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    try:
        cfg = compose(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    import ray
    from aiohttp import web

    from orchestrator.inference.server import build

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=False)
    else:
        from orchestrator.cluster import init_loopback

        init_loopback(include_dashboard=False, log_to_driver=False)
    server = None
    try:
        server = build(cfg)
        i = cfg.inference
        for n, info in enumerate(server.pool.info):
            print(f"replica {n}: KV cache of {info.kv_cache_tokens} tokens ({info.kv_cache_bytes / 2**20:.1f} MiB) "
                  f"on {info.device}, decode attention: {info.attention}", flush=True)
        ready = f"serving {cfg.checkpoint} with {i.replicas} replica(s) on http://{i.host}:{i.port}"
        # aiohttp calls ``print`` once the socket listens.
        web.run_app(server.app, host=i.host, port=i.port, print=lambda _: print(ready, flush=True), access_log=None,
                    handler_cancellation=True)
    finally:
        if server is not None:
            server.pool.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
