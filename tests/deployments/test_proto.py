"""The committed gRPC stubs are what grpcio-tools generates from the committed .proto."""

from __future__ import annotations

import shutil
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTO = "deployments/proto/msa_serve.proto"


def test_stubs_are_fresh(tmp_path):
    (tmp_path / PROTO).parent.mkdir(parents=True)
    shutil.copy(ROOT / PROTO, tmp_path / PROTO)
    status = protoc.main(["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}",
                          f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
                          str(tmp_path / PROTO)])
    assert status == 0
    for name in ("msa_serve_pb2.py", "msa_serve_pb2.pyi", "msa_serve_pb2_grpc.py"):
        fresh = (tmp_path / "deployments/proto" / name).read_text()
        committed = (ROOT / "deployments/proto" / name).read_text()
        assert committed == fresh, f"deployments/proto/{name} is stale: run `make proto`"
