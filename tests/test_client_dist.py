"""The client as other services install it: the built wheel alone (with only its declared dependencies) in
a fresh venv streams bundles from a real server, through the library and through the ``bundlerec`` CLI.

Reuses ``dist/`` when ``make dist`` built it after the last change to the client or the proto; otherwise
builds the sdist and, from it, the wheel here, as ``make dist`` does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "client"
PROTO = ROOT / "proto" / "bundlerec" / "v1" / "bundlerec.proto"
STUBS = ("bundlerec/v1/bundlerec_pb2.py", "bundlerec/v1/bundlerec_pb2.pyi", "bundlerec/v1/bundlerec_pb2_grpc.py", "bundlerec/py.typed")

SCRIPT = """
import json, sys
import bundlerec
from bundlerec import Client, pb

with Client(sys.argv[1], timeout=15.0) as client:
    stream = client.recommend("organic", max_bundles=3)
    bundles = list(stream)
    s = stream.summary
print(json.dumps({
    "module": bundlerec.__file__, "bundles": len(bundles), "ranks": [b.rank for b in bundles],
    "anchors": [b.items[0].role == pb.ITEM_ROLE_ANCHOR for b in bundles],
    "bundles_sent": s.bundles_sent, "stop_reason": pb.StopReason.Name(s.stop_reason),
}))
"""


def _sources() -> list[Path]:
    files = [PROTO, CLIENT / "pyproject.toml", CLIENT / "setup.py", CLIENT / "MANIFEST.in"]
    return files + [p for p in (CLIENT / "bundlerec").rglob("*") if p.is_file() and "_pb2" not in p.name and "__pycache__" not in p.parts]


def _version() -> str:
    for line in (CLIENT / "pyproject.toml").read_text().splitlines():
        if line.startswith("version"):
            return line.split("=", 1)[1].strip().strip('"')
    raise AssertionError("no version in client/pyproject.toml")


def _clean_env() -> dict[str, str]:
    """The environment without anything that would let the fresh venv see this checkout or this venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> tuple[Path, Path]:
    """(sdist, wheel): from dist/ when `make dist` built them after the last change, else built here the same
    way: the sdist, then the wheel from that sdist alone (with this venv's setuptools and grpcio-tools)."""
    name = f"bundlerec_client-{_version()}"
    sdist, wheel = ROOT / "dist" / f"{name}.tar.gz", ROOT / "dist" / f"{name}-py3-none-any.whl"
    newest = max(p.stat().st_mtime for p in _sources())
    if sdist.exists() and wheel.exists() and min(sdist.stat().st_mtime, wheel.stat().st_mtime) >= newest:
        return sdist, wheel
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta as b; b.build_sdist({str(out)!r})"],
                   check=True, cwd=CLIENT, capture_output=True, timeout=300)
    sdist = out / f"{name}.tar.gz"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(sdist)],
                   check=True, cwd=out, timeout=300)
    return sdist, out / f"{name}-py3-none-any.whl"


@pytest.fixture(scope="module")
def wheel(dist) -> Path:
    return dist[1]


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("client-venv") / "v"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
                   check=True, cwd=venv, env=_clean_env(), timeout=600)
    return venv


def test_sdist_carries_the_proto_and_nothing_generated(dist):
    with tarfile.open(dist[0]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert "proto/bundlerec/v1/bundlerec.proto" in names and "setup.py" in names
    assert not [n for n in names if "_pb2" in n], names


def test_wheel_carries_generated_stubs_and_types(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(STUBS) <= names, f"missing from {wheel.name}: {set(STUBS) - names}"
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    lines = zipfile.ZipFile(wheel).read(meta).decode().splitlines()
    requires = sorted(re.split(r"[<>=!~;\[ ]", line.split(":", 1)[1].strip())[0] for line in lines if line.startswith("Requires-Dist:"))
    assert requires == ["grpcio", "protobuf"], requires


def test_wheel_alone_in_fresh_venv_streams_bundles(fresh_venv, server):
    py = str(fresh_venv / "bin" / "python")
    installed = subprocess.run([py, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True,
                               env=_clean_env(), timeout=60)
    names = {p["name"].lower() for p in json.loads(installed.stdout)}
    assert "bundlerec-client" in names and "grpcio-tools" not in names and "bundlerec-server" not in names, names

    proc = subprocess.run([py, "-c", SCRIPT, server.target], capture_output=True, text=True, cwd=fresh_venv,
                          env=_clean_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert str(fresh_venv) in out["module"], out["module"]  # the installed wheel, not this checkout
    assert out["bundles"] == 3 and out["ranks"] == [1, 2, 3] and all(out["anchors"])
    assert out["bundles_sent"] == 3 and out["stop_reason"] == "STOP_REASON_COMPLETE"


def test_installed_cli_streams_to_the_summary(fresh_venv, server):
    proc = subprocess.run([str(fresh_venv / "bin" / "bundlerec"), "--target", server.target, "recommend", "organic", "-n", "2"],
                          capture_output=True, text=True, cwd=fresh_venv, env=_clean_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n#") == 2 and "-- 2 bundles, stopped: complete" in proc.stdout, proc.stdout
