"""Build step of bundlerec-client: generates the protobuf/gRPC stubs (``bundlerec/v1/*_pb2*.py`` and their
``.pyi``) from the proto with grpcio-tools (a build requirement, pinned in pyproject.toml), so every
wheel, sdist build and ``pip install ./client`` carries stubs that match the proto. Nothing generated is
committed: ``proto/bundlerec/v1/bundlerec.proto`` at the repository root is the single source; the
sdist carries a copy of it under ``proto/`` so that it builds on its own.

Everything else (name, version, dependencies) is in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PROTO = Path("bundlerec") / "v1" / "bundlerec.proto"
# the sdist's own copy first, then the repository checkout this package sits in
PROTO_ROOTS = (HERE / "proto", HERE.parent / "proto")


def proto_root() -> Path:
    for root in PROTO_ROOTS:
        if (root / PROTO).is_file():
            return root
    raise FileNotFoundError(
        f"{PROTO} not found under {' or '.join(map(str, PROTO_ROOTS))}: build bundlerec-client from the "
        "repository checkout (pip install ./client) or from its sdist"
    )


def generate_stubs(out: Path) -> None:
    """Runs protoc (from grpcio-tools) on the proto; writes the modules and .pyi stubs under ``out``."""
    from importlib.resources import files

    from grpc_tools import protoc

    root = proto_root()
    include = files("grpc_tools") / "_proto"  # google/protobuf/*.proto (Timestamp)
    args = [
        "grpc_tools.protoc", f"-I{root}", f"-I{include}",
        f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", str(PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {root / PROTO}")


class BuildPyWithStubs(build_py):
    """build_py, then the generated stubs: into the build tree for a wheel (replacing any stale copies
    from a dev checkout), into the source tree for an editable install."""

    def run(self) -> None:
        super().run()
        out = HERE if self.editable_mode else Path(self.build_lib)
        generate_stubs(out)


class SdistWithProto(sdist):
    """The sdist carries the proto (its only input for the stubs) and never generated files."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        dest = Path(base_dir) / "proto" / PROTO
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(proto_root() / PROTO, dest)


setup(cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProto})
