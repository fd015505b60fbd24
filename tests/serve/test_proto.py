"""The checked-in stubs are what grpc_tools.protoc makes of layerpar_v1.proto today.

    .venv/bin/python -m pytest -q tests/serve/test_proto.py
If this fails, regenerate from the repo root:
    python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. layerpar/serve/layerpar_v1.proto
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from grpc_tools import protoc

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PROTO = "layerpar/serve/layerpar_v1.proto"


def test_checked_in_stubs_match_the_proto(tmp_path):
    (tmp_path / "layerpar/serve").mkdir(parents=True)
    shutil.copy(ROOT / PROTO, tmp_path / PROTO)
    rc = protoc.main(["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                      str(tmp_path / PROTO)])
    assert rc == 0
    for name in ("layerpar_v1_pb2.py", "layerpar_v1_pb2_grpc.py"):
        fresh = (tmp_path / "layerpar/serve" / name).read_text()
        assert (ROOT / "layerpar/serve" / name).read_text() == fresh, f"{name} is stale: regenerate it"


def test_service_is_in_package_layerpar_v1():
    from layerpar.serve import layerpar_v1_pb2 as pb

    assert pb.DESCRIPTOR.package == "layerpar.v1"
    methods = set(pb.DESCRIPTOR.services_by_name["Inference"].methods_by_name)
    assert methods == {"Predict", "ModelInfo", "Generate"}
