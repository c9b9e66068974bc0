"""`leanformer serve MODEL --replicas N`: the same OpenAI app (serve/app.py) on N Ray Serve replicas.

Each replica is a Ray actor that loads the model and builds `create_app(model, tok, cfg)`, engine
and all; Ray Serve's HTTP proxy takes the requests on HOST:PORT and hands each to a replica (the less
busy of two picked at random), and the replica's FastAPI app answers it (routes, validation, API key,
streaming, its lifespan starting and draining the engine: all unchanged). Each response carries an
`x-leanformer-replica` header naming the replica's process, so a client can see the spread.

What replicas buy: N engines decoding side by side, for more requests at once than one engine's
batch holds well, on a cluster with the cores (or hosts) for them. On one small machine the engines
compete for the same cores, and continuous batching already fills one engine: expect no gain there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from leanformer.distributed.ray_jobs import cluster_cpus, connect
from leanformer.errors import LeanformerError
from leanformer.serve.app import ServeConfig, create_app

REPLICA_HEADER = "x-leanformer-replica"


class _NameReplica:
    """ASGI middleware: every HTTP response gets the `x-leanformer-replica: host:pid` header."""

    def __init__(self, app, name: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), name.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named)


class Replica:
    """One replica: the model, its engine and the FastAPI app of serve/app.py."""

    def __init__(self, path: str, dtype: str, keep_quantized: bool, cfg: ServeConfig, threads: int) -> None:
        import torch

        from leanformer.loading import load

        torch.set_num_threads(threads)  # the CPUs Ray reserved for this replica
        model, tok = load(path, dtype=dtype, keep_quantized=keep_quantized)
        self.lf_app = create_app(model, tok, cfg)  # (`app` is a property of Ray's wrapper)
        self.lf_app.add_middleware(_NameReplica, name=f"{os.uname().nodename}:{os.getpid()}")

    def __serve_build_asgi_app__(self):  # Ray Serve asks for the ASGI app after __init__
        return self.lf_app


def deploy(
    path: str,
    replicas: int,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    dtype: str = "float32",
    keep_quantized: bool = True,
    cfg: ServeConfig | None = None,
    log_level: str = "warning",
) -> str:
    """Start Ray Serve on HOST:PORT with `replicas` replicas of the app (returns once they answer);
    → the base URL. Joins the running Ray cluster, else starts a local one (ray.init's rules)."""
    if replicas < 1:
        raise LeanformerError(f"--replicas must be at least 1, got {replicas}")
    cfg = cfg or ServeConfig()
    ray = connect("--replicas")
    from ray import serve

    threads = max(1, cluster_cpus(ray) // replicas)
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": log_level.upper()})
    ingress = serve.deployment(serve.ingress()(Replica), name="leanformer")
    app = ingress.options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": threads},
        max_ongoing_requests=max(cfg.max_batch + cfg.max_queue, 1),  # the engine queues; Ray need not
    ).bind(path, dtype, keep_quantized, cfg, threads)
    serve.run(app, name="leanformer", route_prefix="/")
    return f"http://{host}:{port}"


def serve_replicas(
    model_path: str,
    replicas: int,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    dtype: str = "float32",
    keep_quantized: bool = True,
    model_id: str | None = None,
    log_level: str = "info",
    **config,
) -> None:
    """serve.app.serve with `replicas` Ray Serve replicas: serve until Ctrl-C, then shut Serve down."""
    cfg = ServeConfig(model_id=model_id or Path(model_path).stem, **config)  # bad settings fail first
    url = deploy(
        model_path,
        replicas,
        host,
        port,
        dtype=dtype,
        keep_quantized=keep_quantized,
        cfg=cfg,
        log_level=log_level,
    )
    print(f"serving {cfg.model_id} on {url} with {replicas} Ray Serve replicas (Ctrl-C stops)", flush=True)
    import ray
    from ray import serve

    # Ctrl-C drains the replicas' engines; SIGTERM is Ray's own (its driver aborts, the local cluster
    # goes down with it, in-flight requests are cut)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()  # each replica's lifespan drains its engine
        ray.shutdown()  # a local cluster started for this server stops; a joined one is left running
