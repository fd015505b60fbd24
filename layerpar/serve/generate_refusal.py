"""Generate on a server of an image classifier: FAILED_PRECONDITION with one sentence.

Its own module so that server.py (which registers it) and generate_rpc.py (the language model's
server, which builds on server.py) do not import each other."""

from __future__ import annotations

import grpc

from layerpar.serve import layerpar_v1_pb2 as pb

NOT_AN_LM = ("this server serves an image classifier; Generate needs a server started on a language "
             "model checkpoint (model.kind paraformer_lm or serial_lm)")


def not_an_lm_handler(count) -> grpc.RpcMethodHandler:
    """Generate on an image server: FAILED_PRECONDITION (count(method, status) first)."""

    async def generate(raw: bytes, context):
        count("Generate", "FAILED_PRECONDITION")
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NOT_AN_LM)
        yield pb.GenerateResponse()  # never reached: makes this an async generator

    return grpc.unary_stream_rpc_method_handler(
        generate, response_serializer=pb.GenerateResponse.SerializeToString)
