"""Transport security: an optional bearer token checked on the model's calls, and optional TLS.

The token travels as gRPC metadata ``authorization: Bearer <token>``; a call without it, or with
another token, ends with UNAUTHENTICATED before any handler runs. The server reads the token from the
file serve.token_file, else from the environment variable LAYERPAR_SERVE_TOKEN; it is never a config
value, so it is not copied to workers, config.yaml or checkpoint manifests. With serve.health_auth
`open` (the default) health and reflection stay callable without it, as Kubernetes' built-in gRPC
probes and Triton-style clients expect; `token` guards every method.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Callable
from pathlib import Path

import grpc

TOKEN_ENV = "LAYERPAR_SERVE_TOKEN"
# Services a probe or a tool may call without the token when serve.health_auth is `open`.
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")


def resolve_token(token_file: str | None) -> str | None:
    """The serving token: the file's content (stripped) if one is named, else $LAYERPAR_SERVE_TOKEN.
    A named file that is missing, unreadable or empty is a ValueError (one sentence)."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"serve.token_file {token_file!r} cannot be read ({exc.__class__.__name__}: "
                             f"{getattr(exc, 'strerror', None) or exc}); point it at a file holding the "
                             "token") from None
        if not token:
            raise ValueError(f"serve.token_file {token_file!r} is empty; write the token into it")
        return token
    return os.environ.get(TOKEN_ENV) or None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def security_warnings(host: str, *, token: str | None, tls: bool) -> list[str]:
    """What an operator should hear about before binding beyond this machine."""
    if _is_loopback(host):
        return []
    out = []
    if not token:
        out.append(f"serving on {host} without a token ({TOKEN_ENV} or serve.token_file): anyone who "
                   "can reach the port can call it")
    if not tls:
        out.append(f"serving on {host} without TLS: requests{' and the token' if token else ''} "
                   "travel in clear text (set serve.tls_cert and serve.tls_key)")
    return out


def _deny(kind: str):
    """A handler of the same kind as the one refused, that answers UNAUTHENTICATED."""
    message = f"missing or wrong bearer token: send metadata 'authorization: Bearer <{TOKEN_ENV}>'"

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    make = {
        "unary_unary": lambda: grpc.unary_unary_rpc_method_handler(unary),
        "unary_stream": lambda: grpc.unary_stream_rpc_method_handler(unary),
        "stream_unary": lambda: grpc.stream_unary_rpc_method_handler(stream),
        "stream_stream": lambda: grpc.stream_stream_rpc_method_handler(stream),
    }
    return make[kind]()


# The Open Inference Protocol's health calls, open like grpc.health.v1 (its metadata and ModelInfer are not).
OPEN_METHODS = tuple(f"/inference.GRPCInferenceService/{m}"
                     for m in ("ServerLive", "ServerReady", "ModelReady"))


def is_open(method: str) -> bool:
    """True for health and reflection calls ("/grpc.health.v1.Health/Check", ...)."""
    return method.lstrip("/").rpartition("/")[0] in OPEN_SERVICES or method in OPEN_METHODS


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuse every call whose `authorization` metadata is not `Bearer <token>` (health and
    reflection excepted when health_auth is `open`)."""

    def __init__(self, token: str, on_refused: Callable[[str], None] | None = None, *,
                 health_auth: str = "open"):
        self._expected = f"Bearer {token}".encode()
        self.on_refused = on_refused  # (full method name) -> None, for metrics
        self.open_health = health_auth == "open"

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if self.open_health and handler is not None and is_open(details.method):
            return handler
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        got = got.encode() if isinstance(got, str) else got
        if hmac.compare_digest(got, self._expected):  # constant time: no token guessing by timing
            return handler
        if self.on_refused:
            self.on_refused(details.method)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED... only to callers with the token
            return _deny("unary_unary")
        kind = ("stream" if handler.request_streaming else "unary") + "_" + \
               ("stream" if handler.response_streaming else "unary")
        return _deny(kind)


def server_credentials(cert: str, key: str) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])


def channel_credentials(ca: str | None) -> grpc.ChannelCredentials:
    """TLS for a client; `ca` is the PEM that signed the server's certificate (None: system roots)."""
    return grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes() if ca else None)
