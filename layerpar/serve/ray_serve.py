"""A Ray Serve deployment of the engine: each Serve replica owns one layer-parallel branch group (its W
worker bundles in the replica's own placement group) and runs the InferenceServer's batcher, latency
target and health loop inside; Serve's HTTP proxy on every node routes the Open Inference Protocol's
REST calls (/v2/...) to the replicas, and Serve's autoscaler adds and removes replicas between
serve.ray_min_replicas and serve.ray_max_replicas.

    serve run launch/configs/serve_app.yaml                       # the commented Serve config
    serve run layerpar.serve.ray_serve:app checkpoint=runs/<run> set=parallel.workers=2
    curl http://127.0.0.1:8000/v2/models/layerpar                 # Serve's HTTP proxy

In Python (tests): ``serve.run(build_app({"checkpoint": path, "set": ["parallel.workers=2"]}),
route_prefix="/")``. The translation between the protocol and the engine is http_oip.py's (the same
routes, handlers, token check and error statuses); only the request object comes from Starlette.

A replica's placement group: bundle 0 holds the replica actor ({"CPU": REPLICA_CPUS}), bundles 1..W
its branch workers (parallel.cpus_per_worker / gpus_per_worker), with strategy parallel.placement;
the engine takes them with parallel.placement_group `current` (runtime/group.py). Serve removes the
group with the replica. A lost worker is replaced inside the group by the engine's own recovery
(requests wait for it, as on the standalone server); a replica whose engine stays down longer than its
start-up bound fails Serve's health check and is replaced.
"""

from __future__ import annotations

import asyncio
import re
import time
from types import SimpleNamespace

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from layerpar.serve.http_oip import HEADER, ROUTES, HttpFrontEnd

REPLICA_CPUS = 0.1  # the replica actor: an event loop and the batcher thread; the workers compute
DEPLOYMENT = "layerpar"  # the deployment's name (serve status; handles)
_PATTERNS = [re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$") for _, path, _, _ in ROUTES]


class _Call:
    """What HttpFrontEnd's handlers read of an aiohttp request, made from Serve's Starlette one."""

    def __init__(self, request: Request, body: bytes, match_info: dict[str, str]):
        self.method, self.path, self.headers = request.method, request.url.path, request.headers
        self.match_info, self._body = match_info, body

    async def read(self) -> bytes:
        return self._body


def route(method: str, path: str) -> tuple[str, str | None, dict[str, str], int]:
    """(route name as the aiohttp app names it, handler, path parameters, 200); no such route: ("",
    None, {}, 404), or 405 for a path of the table under another HTTP method."""
    status = 404
    for i, ((want, _, handler, name), pattern) in enumerate(zip(ROUTES, _PATTERNS, strict=True)):
        found = pattern.match(path)
        if found and want == method:
            return f"{name}.r{i}", handler, found.groupdict(), 200
        if found:
            status = 405
    return "", None, {}, status


@serve.deployment(name=DEPLOYMENT)
class LayerparDeployment:
    """One Serve replica: an engine (one branch group) behind an InferenceServer (batcher, health,
    latency target), answering the Open Inference Protocol's REST calls Serve's proxy routes here."""

    async def __init__(self, config: dict, checkpoint: str | None = None, classes: list[str] | None = None,
                     checkpoint_id: str = ""):
        from pathlib import Path

        from layerpar.config import from_dict
        from layerpar.runtime.backend import make_backend
        from layerpar.serve.launcher import load_weights_into
        from layerpar.serve.server import InferenceServer

        cfg = from_dict(config)
        loop = asyncio.get_running_loop()
        # Starting the workers blocks for a while (actors import torch): off the replica's event loop.
        self.backend = await loop.run_in_executor(None, lambda: load_weights_into(
            make_backend(cfg), Path(checkpoint) if checkpoint else None))
        try:
            self.server = InferenceServer(cfg, self.backend, classes=classes, checkpoint_id=checkpoint_id)
            await self.server.start()  # batcher + health loop; its own gRPC port: a free loopback one
        except BaseException:
            await loop.run_in_executor(None, self.backend.shutdown)
            raise
        self.front = HttpFrontEnd(self.server, token=self.server.token)
        p = cfg.parallel
        self.down_limit_s = p.placement_timeout_s + p.timeout_s  # the engine's own start-up bound
        self.last_serving = time.monotonic()

    async def __call__(self, request: Request) -> Response:
        name, handler, params, status = route(request.method, request.url.path)
        body = await request.body()
        limit = self.server.cfg.serve.max_message_bytes
        if len(body) > limit:  # what aiohttp's client_max_size refuses on the standalone REST port
            self.server.metrics.request("http:" + (name.partition(".")[0] or "unknown"), "RESOURCE_EXHAUSTED")
            return JSONResponse({"error": f"the request body exceeds serve.max_message_bytes ({limit} "
                                          "bytes); send fewer rows"}, status_code=413)
        call = _Call(request, body, params)
        if handler is None:
            out = await self.front.guarded(name, call, lambda _: self._missing(call, status))
        else:
            out = await self.front.guarded(name, call, getattr(self.front, handler))
        headers = {HEADER: out.headers[HEADER]} if HEADER in out.headers else None
        return Response(out.body, status_code=out.status, media_type=out.content_type, headers=headers)

    async def _missing(self, call: _Call, status: int):
        from aiohttp import web

        # the front end's guard answers these as the aiohttp app does (404 / 405, the protocol's JSON)
        raise web.HTTPNotFound() if status == 404 else web.HTTPMethodNotAllowed(call.method, [])

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine has not served for longer than its start-up
        bound (parallel.placement_timeout_s + timeout_s) is not coming back; Serve replaces it."""
        now = time.monotonic()
        if self.server.serving:
            self.last_serving = now
        elif now - self.last_serving > self.down_limit_s:
            raise RuntimeError(f"the engine has not served for {now - self.last_serving:.0f}s "
                               f"(limit {self.down_limit_s:g}s)")

    def worker_pids(self) -> list[int]:
        """The process id of each branch worker of this replica (tests kill one)."""
        pids = getattr(self.backend, "worker_pids", None)
        return pids() if pids else []

    def placement(self) -> dict[str, str | None]:
        """The placement group this replica runs in and the one its workers were placed in (hex ids)."""
        import ray

        mine = ray.util.get_current_placement_group()
        group = getattr(getattr(self.backend, "group", None), "_pg", None)
        return {"replica": mine.id.hex() if mine else None, "workers": group.id.hex() if group else None}

    def serving(self) -> bool:
        return self.server.serving

    async def __del__(self):
        try:
            await self.server.stop()
        finally:
            await asyncio.get_running_loop().run_in_executor(None, self.backend.shutdown)


def deployment_options(cfg, autoscaling: dict | None = None) -> dict:
    """Serve's options for one replica = one branch group of cfg (see the module's docstring).
    autoscaling: extra autoscaling_config keys (upscale_delay_s, downscale_delay_s, ...)."""
    from layerpar.runtime.placement import worker_bundle

    s, p = cfg.serve, cfg.parallel
    options = {"max_ongoing_requests": s.ray_max_ongoing_requests,
               "ray_actor_options": {"num_cpus": REPLICA_CPUS}}
    if p.workers >= 1:
        options["placement_group_bundles"] = [{"CPU": REPLICA_CPUS}] + [worker_bundle(p)] * p.workers
        options["placement_group_strategy"] = p.placement
    if s.ray_max_replicas > s.ray_min_replicas or autoscaling:
        options["autoscaling_config"] = {"min_replicas": s.ray_min_replicas,
                                         "max_replicas": s.ray_max_replicas,
                                         "target_ongoing_requests": s.ray_target_ongoing_requests,
                                         **(autoscaling or {})}
    else:
        options["num_replicas"] = s.ray_min_replicas
    return options


def replica_config(cfg):
    """cfg as a replica runs it: workers in its own placement group, the server's own ports on
    loopback only (port 0; metrics and REST off: Serve's proxy is the front door)."""
    changes = {"placement_group": "current"} if cfg.parallel.workers >= 1 else {}
    if cfg.parallel.replicas > 1:
        raise ValueError(f"parallel.replicas ({cfg.parallel.replicas}) must be 1 under Ray Serve: each "
                         "Serve replica is one branch group; set serve.ray_max_replicas instead")
    return cfg.replace(parallel=changes, serve={"host": "127.0.0.1", "port": 0, "metrics_port": -1,
                                                "http_port": -1})


def build_app(args: dict):
    """The Serve application (`serve run layerpar.serve.ray_serve:build_app` and serve_app.yaml's
    import_path). args: checkpoint (a checkpoint or run directory; none: fresh weights), config (a
    YAML path or packaged name; default the checkpoint's), set (a list of "section.key=value"),
    autoscaling (extra autoscaling_config keys)."""
    from layerpar.serve.launcher import classes_of, resolve

    sets = args.get("set") or []
    if isinstance(sets, str):  # `serve run ... set=serve.max_wait_ms=2`: one override
        sets = [sets]
    ns = SimpleNamespace(checkpoint=args.get("checkpoint"), config=args.get("config"), set=list(sets),
                         host=None, port=None, metrics_port=None, http_port=None)
    cfg, ckpt_dir, manifest = resolve(ns)
    cfg = replica_config(cfg)
    checkpoint_id = f"{ckpt_dir.name}@step{manifest.get('step', '?')}" if ckpt_dir else ""
    deployment = LayerparDeployment.options(**deployment_options(cfg, args.get("autoscaling")))
    return deployment.bind(cfg.to_dict(), str(ckpt_dir) if ckpt_dir else None, classes_of(manifest),
                           checkpoint_id)


app = build_app  # `serve run layerpar.serve.ray_serve:app checkpoint=...`: an application builder
