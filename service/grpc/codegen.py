"""Generate the Python stubs of `proto/` into `service/grpc/stubs/` and the client library's copy in
`clients/python/dense_serve_client/_proto/` (both committed; tests check they are current).
Run: `python -m service.grpc.codegen`."""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PROTO = PROTO_ROOT / "dense" / "v1" / "dense.proto"
STUBS = Path(__file__).resolve().parent / "stubs"
PACKAGE = "service.grpc.stubs"
#: The client ships its own stubs: it must not import `service` (nor torch).
CLIENT_STUBS = REPO / "clients" / "python" / "dense_serve_client" / "_proto"
CLIENT_PACKAGE = "dense_serve_client._proto"


def generate(out: Path = STUBS, package: str = PACKAGE) -> list[Path]:
    import tempfile

    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / "dense" / "v1").iterdir()):
            text = src.read_text()
            # protoc writes absolute imports from the proto root; make them package-relative to this repo.
            text = re.sub(r"^from dense\.v1 import", f"from {package} import", text, flags=re.M)
            target = out / src.name
            target.write_text(text)
            written.append(target)
        note = '"""Generated from proto/dense/v1/dense.proto by service/grpc/codegen.py; do not edit."""\n'
        (out / "__init__.py").write_text(note)
    return written


if __name__ == "__main__":
    for path in [*generate(), *generate(CLIENT_STUBS, CLIENT_PACKAGE)]:
        print(path.relative_to(REPO))
    sys.exit(0)
