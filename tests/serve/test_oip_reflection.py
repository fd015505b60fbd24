"""Server reflection lists and describes the Open Inference Protocol's service beside layerpar.v1, read
with grpc's own reflection client (ProtoReflectionDescriptorDatabase), against a real server on
127.0.0.1.

    .venv/bin/python -m pytest -q tests/serve/test_oip_reflection.py
"""

from __future__ import annotations

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from layerpar.serve import oip_pb
from layerpar.serve.server import ServerThread
from tests.serve.helpers import tiny_cfg


def test_reflection_lists_and_describes_both_inference_services(local_backend):
    with ServerThread(tiny_cfg(), local_backend) as srv, grpc.insecure_channel(srv.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"layerpar.v1.Inference", oip_pb.SERVICE, "grpc.health.v1.Health"} <= services
        pool = DescriptorPool(db)  # descriptors fetched from the server, as grpcurl does
        oip = pool.FindServiceByName(oip_pb.SERVICE)
        assert {m.name for m in oip.methods} >= set(oip_pb.METHODS)
        infer = oip.FindMethodByName("ModelInfer")
        assert infer.input_type.full_name == "inference.ModelInferRequest"
        assert "raw_input_contents" in infer.input_type.fields_by_name
        assert pool.FindServiceByName("layerpar.v1.Inference").FindMethodByName("Predict")
