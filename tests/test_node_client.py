"""Callers in another language: TypeScript stubs generated from the same proto (buf + ts-proto, see
buf.gen.yaml) and @grpc/grpc-js call Recommend on a real server and read the stream to its summary.

Runs `npm ci` (from clients/node/package-lock.json) when node_modules is missing or older than the lock
file, regenerates the stubs and compiles clients/node/src/smoke.ts, then runs it with node."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NODE = ROOT / "clients" / "node"


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> None:
    proc = subprocess.run(cmd, cwd=NODE, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def smoke_js() -> Path:
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not found on PATH: the Node client test needs Node 20+ and npm")
    # buf comes from the buf-bin package in this venv (requirements.txt)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    assert shutil.which("buf", path=env["PATH"]), "buf not found: pip install buf-bin (requirements.txt)"
    installed = NODE / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < (NODE / "package-lock.json").stat().st_mtime:
        _run(["npm", "ci", "--no-audit", "--no-fund"], env, timeout=300)
    _run(["npm", "run", "build"], env, timeout=300)  # buf generate (src/gen) + tsc (dist)
    return NODE / "dist" / "smoke.js"


def _smoke(smoke_js: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["node", str(smoke_js), *args], capture_output=True, text=True, timeout=60)


def test_node_stubs_stream_bundles_to_the_summary(smoke_js, server):
    proc = _smoke(smoke_js, server.target, "organic", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [["bundle", "1"], ["bundle", "2"], ["bundle", "3"]], lines
    assert all("items=" in line and "anchor=" in line for line in lines[:-1])
    assert lines[-1].startswith("summary bundles_sent=3 stop_reason=STOP_REASON_COMPLETE"), lines


def test_node_stubs_surface_rpc_errors(smoke_js, server):
    proc = _smoke(smoke_js, server.target, "   ")  # an empty query is rejected: INVALID_ARGUMENT (3)
    assert proc.returncode == 2 and "code=3" in proc.stderr, proc.stdout + proc.stderr
