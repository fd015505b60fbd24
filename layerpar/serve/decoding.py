"""Undecodable request bytes are INVALID_ARGUMENT on every method, not UNKNOWN.

gRPC runs a handler's request deserializer before any handler code: when it raises, the call ends
with UNKNOWN and a message naming the Python exception class. `DecodeGuard` (a server interceptor)
gives every handler raw bytes instead and decodes them itself, so that a garbage message is refused
with INVALID_ARGUMENT and one sentence, for Predict, ModelInfo, health and reflection alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _message_name(deserializer) -> str:
    owner = getattr(deserializer, "__self__", None)  # Message.FromString is bound to its class
    return getattr(getattr(owner, "DESCRIPTOR", None), "full_name", None) or "request"


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Decode each request inside the handler; garbage -> INVALID_ARGUMENT (on_invalid(method) first)."""

    def __init__(self, on_invalid: Callable[[str], None] | None = None):
        self.on_invalid = on_invalid

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler  # unknown method, or one that takes raw bytes already (Predict)
        method, deserialize = details.method, handler.request_deserializer
        message = f"request is not a valid {_message_name(deserialize)} message"

        async def decode(raw: bytes, context):
            try:
                return deserialize(raw)
            except Exception:  # noqa: BLE001 - any parse failure is the caller's bad bytes
                if self.on_invalid:
                    self.on_invalid(method)
                await context.abort(INVALID, message)

        async def decoded_stream(raws, context):
            async for raw in raws:
                yield await decode(raw, context)

        async def run(result, context):
            """Await a coroutine handler, or forward what an async-generator handler yields."""
            if inspect.isasyncgen(result):
                async for response in result:
                    await context.write(response)
            elif inspect.isawaitable(result):
                return await result
            else:
                return result

        out = handler.response_serializer
        if handler.request_streaming:
            behaviour = handler.stream_stream or handler.stream_unary

            async def streaming(raws, context):
                return await run(behaviour(decoded_stream(raws, context), context), context)

            make = grpc.stream_stream_rpc_method_handler if handler.response_streaming \
                else grpc.stream_unary_rpc_method_handler
            return make(streaming, response_serializer=out)
        behaviour = handler.unary_stream or handler.unary_unary

        async def unary(raw, context):
            return await run(behaviour(await decode(raw, context), context), context)

        make = grpc.unary_stream_rpc_method_handler if handler.response_streaming \
            else grpc.unary_unary_rpc_method_handler
        return make(unary, response_serializer=out)
