"""Build step: generates the gRPC stubs from the service's protos into the built package.

protoc writes `normserve/v1/*.proto` as the modules `normserve/v1/*_pb2.py`, whose imports read
`from normserve.v1 import tensor_pb2`. Generating them into this package's own directory makes
those imports resolve to `normserve.v1` as they stand, so nothing is rewritten. Nothing
generated is committed: a wheel gets the stubs in its build directory, and an editable install
gets them in `src/` (ignored by git).
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
SERVICE_PROTOS = HERE.parent.parent / "proto"
CLIENT_PROTOS = HERE / "proto"
SOURCES = ["normserve/v1/tensor.proto", "normserve/v1/batch_norm.proto", "normserve/v1/sync_batch_norm.proto"]
CLIENT_SOURCES = ["normserve/status_details.proto"]


def protoc_command() -> list[str]:
    """Debian's protoc with its gRPC plugin, else grpcio-tools' bundled compiler."""
    protoc = shutil.which("protoc")
    plugin = shutil.which("grpc_python_plugin")
    if protoc and plugin:
        return [protoc, f"--plugin=protoc-gen-grpc_python={plugin}"]
    if importlib.util.find_spec("grpc_tools") is not None:
        return [sys.executable, "-m", "grpc_tools.protoc"]
    raise RuntimeError(
        "generating the gRPC stubs needs protoc and grpc_python_plugin "
        "(apt-get install protobuf-compiler protobuf-compiler-grpc) or grpcio-tools"
    )


def generate(out: Path) -> None:
    """Writes the stubs, their .pyi type stubs and the `normserve.v1` package file under `out`."""
    if not (SERVICE_PROTOS / SOURCES[0]).is_file():
        raise RuntimeError(f"{SERVICE_PROTOS} does not hold normserve's protos: build from a checkout of the repository")
    base = protoc_command() + [f"-I{SERVICE_PROTOS}", f"-I{CLIENT_PROTOS}", f"--python_out={out}", f"--pyi_out={out}"]
    subprocess.run(base + [f"--grpc_python_out={out}", *SOURCES], check=True)
    subprocess.run(base + CLIENT_SOURCES, check=True)
    (out / "normserve" / "v1" / "__init__.py").write_text('"""gRPC stubs generated from proto/normserve/v1 at build time."""\n')


class BuildWithStubs(build_py):
    def run(self) -> None:
        super().run()
        # An editable install runs this too; its package is the source tree itself.
        generate(HERE / "src" if self.editable_mode else Path(self.build_lib))


setup(cmdclass={"build_py": BuildWithStubs})
