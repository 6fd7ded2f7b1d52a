"""Regenerate ``caffe_pb2.py`` from ``caffe.proto``: ``python -m readonly_ohem.caffe.proto.regenerate``.

Needs ``grpcio-tools`` (it bundles ``protoc``): ``pip install grpcio-tools``. The generated module
is checked in, so users never need protoc; ``tests/caffe/test_proto.py`` proves it matches the schema.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def generate(out_dir: Path) -> Path:
    """Run protoc on caffe.proto, writing ``caffe_pb2.py`` into ``out_dir``; return its path."""
    from grpc_tools import protoc

    rc = protoc.main(["protoc", f"-I{HERE}", f"--python_out={out_dir}", str(HERE / "caffe.proto")])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    return out_dir / "caffe_pb2.py"


if __name__ == "__main__":
    path = generate(HERE)
    print(f"wrote {path}", file=sys.stderr)
