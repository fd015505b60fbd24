"""The Open Inference Protocol over HTTP/REST (`/v2/...`) on serve.http_port, on the InferenceServer's
own event loop (aiohttp, which Ray's `default` extra installs), in front of the same batcher, engine,
token, TLS and metrics as gRPC.

    curl http://127.0.0.1:8000/v2/health/ready
    curl http://127.0.0.1:8000/v2/models/layerpar
    curl -X POST http://127.0.0.1:8000/v2/models/layerpar/infer -d \
      '{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0, ...]}],
        "parameters": {"num_branches": 2}}'

Errors are {"error": "<one sentence>"} with 400 (bad request), 401 (token), 404 (unknown model or
path), 429 (queue full), 503 (draining, engine down), 504 (deadline). The binary tensor extension
(header Inference-Header-Content-Length, `binary_data_size`, `binary_data_output`) is served: it is
what tritonclient.http sends by default.
"""

from __future__ import annotations

import hmac
import json
import ssl
import time

import numpy as np
from aiohttp import web

from layerpar.serve.codec import BadRequest
from layerpar.serve.oip import HTTP_STATUS, OUTPUT, VERSION, Code, OipError, OipModel, Tensor

HEADER = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]
LABEL = "http:"  # metrics: REST calls count under method "http:<the gRPC method's name>"
# (HTTP method, path, HttpFrontEnd handler, the gRPC method's name): the aiohttp app here and the Ray
# Serve ingress (serve/ray_serve.py) route the same table to the same handlers.
ROUTES = [("GET", "/v2/health/live", "live", "ServerLive"),
          ("GET", "/v2/health/ready", "ready", "ServerReady"),
          ("GET", "/v2", "server_metadata", "ServerMetadata"),
          ("GET", "/v2/models/{name}", "metadata", "ModelMetadata"),
          ("GET", "/v2/models/{name}/versions/{version}", "metadata", "ModelMetadata"),
          ("GET", "/v2/models/{name}/ready", "model_ready", "ModelReady"),
          ("GET", "/v2/models/{name}/versions/{version}/ready", "model_ready", "ModelReady"),
          ("POST", "/v2/models/{name}/infer", "infer", "ModelInfer"),
          ("POST", "/v2/models/{name}/versions/{version}/infer", "infer", "ModelInfer")]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class HttpFrontEnd:
    """aiohttp app serving /v2 for one InferenceServer; start() -> port, stop()."""

    def __init__(self, server, *, token: str | None):
        self.server, self.model = server, OipModel(server)
        self.count = server.metrics.request
        self._expected = f"Bearer {token}".encode() if token else None
        self.open_health = server.cfg.serve.health_auth == "open"
        self.app = web.Application(client_max_size=server.cfg.serve.max_message_bytes,
                                   middlewares=[self._guard])
        for i, (method, path, handler, name) in enumerate(ROUTES):  # names must be unique identifiers
            self.app.router.add_route(method, path, getattr(self, handler), name=f"{name}.r{i}")
        self.runner = None

    async def start(self, host: str, port: int, *, cert: str | None, key: str | None) -> int:
        context = None
        if cert:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert, key)
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=context, reuse_port=False)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    # ------------------------------------------------------------------ auth, errors, metrics

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        return await self.guarded(request.match_info.route.name or "", request, handler)

    async def guarded(self, info: str, request, handler):
        """handler(request) behind the token check, with errors as the protocol's JSON and every call
        counted; info: the route's name ("ModelInfer.r7"). The Ray Serve ingress calls it too."""
        method = LABEL + (info.partition(".")[0] or "unknown")
        health = info.startswith(("ServerLive.", "ServerReady.", "ModelReady."))
        if self._expected is not None and not (health and self.open_health):
            got = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(got, self._expected):  # constant time, like the gRPC interceptor
                self.count(method, "UNAUTHENTICATED")
                return _error(401, "missing or wrong bearer token: send the header "
                                   "'Authorization: Bearer <LAYERPAR_SERVE_TOKEN>'")
        try:
            response = await handler(request)
        except OipError as exc:
            self.count(method, exc.code.name)
            return _error(HTTP_STATUS.get(exc.code, 500), exc.message)
        except web.HTTPRequestEntityTooLarge:
            self.count(method, "RESOURCE_EXHAUSTED")
            return _error(413, f"the request body exceeds serve.max_message_bytes "
                               f"({self.server.cfg.serve.max_message_bytes} bytes); send fewer rows")
        except web.HTTPException as exc:  # no such path or method: the protocol's JSON error too
            self.count(method, "NOT_FOUND" if exc.status == 404 else "UNIMPLEMENTED")
            return _error(exc.status, f"{request.method} {request.path} is not a path of the Open "
                                      "Inference Protocol served here (/v2/...)")
        self.count(method, "OK")  # a handler's own answers are OK (not ready is an answer); errors raise
        return response

    # ------------------------------------------------------------------ health and metadata

    async def live(self, request):
        return web.json_response({"live": True})

    async def ready(self, request):
        ready = self.model.ready()
        return web.json_response({"ready": ready}, status=200 if ready else 400)  # the protocol: 4xx

    async def server_metadata(self, request):
        return web.json_response(self.model.server_metadata(EXTENSIONS))

    async def metadata(self, request):
        self.model.check(request.match_info["name"], request.match_info.get("version", ""))
        return web.json_response(self.model.metadata())

    async def model_ready(self, request):
        self.model.check(request.match_info["name"], request.match_info.get("version", ""))
        ready = self.model.ready()
        return web.json_response({"name": self.model.name, "ready": ready}, status=200 if ready else 400)

    # ------------------------------------------------------------------ infer

    async def infer(self, request):
        t0 = time.perf_counter()
        self.model.check(request.match_info["name"], request.match_info.get("version", ""))
        try:
            body, tensors, params, outputs, binary_out = await self._parse(request)
            d, timeout = self.model.decode(tensors, params, [o for o, _ in outputs])
        except BadRequest as exc:
            raise OipError(Code.INVALID_ARGUMENT, str(exc)) from None
        answer = await self.model.infer(d, None, timeout, t0)
        logits = np.ascontiguousarray(answer.logits, dtype="<f4")  # (B, num_classes)
        out = {"name": OUTPUT, "datatype": "FP32", "shape": list(logits.shape)}
        binary = binary_out if not outputs else outputs[0][1]
        if binary:
            out["parameters"] = {"binary_data_size": logits.nbytes}
        else:
            out["data"] = logits.ravel().tolist()
        head = {"model_name": self.model.name, "model_version": VERSION,
                "parameters": self.model.parameters(answer), "outputs": [out]}
        if "id" in body:
            head["id"] = body["id"]
        self.server.metrics.phase.labels(phase="total").observe(time.perf_counter() - t0)
        if not binary:
            return web.json_response(head)
        text = json.dumps(head).encode()
        return web.Response(body=text + logits.tobytes(), content_type="application/octet-stream",
                            headers={HEADER: str(len(text))})

    async def _parse(self, request):
        """(body, input tensors, parameters, [(output name, binary?)], binary_data_output)."""
        if request.headers.get("Content-Encoding", "identity") != "identity":
            raise BadRequest(f"Content-Encoding {request.headers['Content-Encoding']!r} is not supported; "
                             "send the request uncompressed")
        raw = await request.read()
        length = request.headers.get(HEADER)
        try:
            split = len(raw) if length is None else int(length)
        except ValueError:
            raise BadRequest(f"header {HEADER} ({length!r}) must be an integer") from None
        if not 0 <= split <= len(raw):
            raise BadRequest(f"header {HEADER} ({split}) must be in 0..{len(raw)} (the body's size)")
        try:
            body = json.loads(raw[:split])
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("request body is not a JSON inference request (the Open Inference "
                             "Protocol's {\"inputs\": [...]})") from None
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            raise BadRequest("request body must be a JSON object with a list of \"inputs\"")
        params = _dict(body.get("parameters"), "parameters")
        binary, offset, tensors = raw[split:], 0, []
        for t in body["inputs"]:
            t = _dict(t, "each input")
            tp = _dict(t.get("parameters"), "an input's parameters")
            shape = t.get("shape")
            if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool)
                                                      for n in shape):
                raise BadRequest("each input needs a \"shape\": a list of integers")
            size = tp.get("binary_data_size")
            if size is None:
                tensors.append(Tensor(str(t.get("name")), str(t.get("datatype")), shape,
                                      values=t.get("data")))
                continue
            if not isinstance(size, int) or not 0 <= size <= len(binary) - offset:
                raise BadRequest(f"binary_data_size ({size!r}) is more than the {len(binary) - offset} "
                                 "binary bytes left after the JSON header")
            tensors.append(Tensor(str(t.get("name")), str(t.get("datatype")), shape,
                                  raw=binary[offset:offset + size]))
            offset += size
        if offset != len(binary):
            raise BadRequest(f"the body holds {len(binary) - offset} binary bytes that no input's "
                             "binary_data_size claims")
        outputs = []
        for o in body.get("outputs") or []:
            o = _dict(o, "each output")
            op = _dict(o.get("parameters"), "an output's parameters")
            extra = sorted(set(op) - {"binary_data"})
            if extra:
                raise BadRequest(f"output parameter {extra[0]!r} is not supported; ask for the output by "
                                 "name (binary_data true or false)")
            outputs.append((str(o.get("name")), bool(op.get("binary_data", False))))
        return body, tensors, params, outputs, bool(params.get("binary_data_output", False))


def _dict(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value
