"""Transport security: an optional bearer token checked on every call, and optional TLS.

The token travels as gRPC metadata ``authorization: Bearer <token>``; a call without it, or with
another token, ends with UNAUTHENTICATED before any handler runs (health and reflection included).
"""

from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path

import grpc


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
        out.append(f"serving on {host} without serve.token: anyone who can reach the port can call it")
    if not tls:
        out.append(f"serving on {host} without TLS: requests{' and the token' if token else ''} "
                   "travel in clear text (set serve.tls_cert and serve.tls_key)")
    return out


def _deny(kind: str):
    """A handler of the same kind as the one refused, that answers UNAUTHENTICATED."""
    message = "missing or wrong bearer token: send metadata 'authorization: Bearer <serve.token>'"

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


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuse every call whose `authorization` metadata is not `Bearer <token>`."""

    def __init__(self, token: str, on_refused=None):
        self._expected = f"Bearer {token}".encode()
        self.on_refused = on_refused  # (method name) -> None, for metrics

    async def intercept_service(self, continuation, details):
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        got = got.encode() if isinstance(got, str) else got
        handler = await continuation(details)
        if hmac.compare_digest(got, self._expected):  # constant time: no token guessing by timing
            return handler
        if self.on_refused:
            self.on_refused(details.method.rsplit("/", 1)[-1])
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
