"""Compiles proto/ into gpu_router/api at build time, so the wire contract has one source."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


def compile_protos() -> None:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", "-Iproto", f"-I{include}", "--python_out=.", "--pyi_out=.", *protos]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {protos}")


class BuildWithProtos(build_py):
    def run(self) -> None:
        compile_protos()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
