"""The proto passes `buf lint` (STANDARD + COMMENTS: every RPC, message, field and enum value commented) and
`buf format`, with only the exceptions buf.yaml lists and explains."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def buf() -> str:
    path = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    if path is None:
        pytest.skip("buf not found: pip install buf-bin (requirements.txt)")
    return path


def _buf(buf: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([buf, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_buf_lint_clean(buf):
    proc = _buf(buf, "lint")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_buf_format_clean(buf):
    proc = _buf(buf, "format", "--diff", "--exit-code", "proto")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_lint_exceptions_are_the_documented_ones():
    yaml = pytest.importorskip("yaml")
    text = (ROOT / "buf.yaml").read_text()
    ignored = yaml.safe_load(text)["lint"]["ignore_only"]
    assert sorted(ignored) == ["RPC_REQUEST_STANDARD_NAME", "SERVICE_SUFFIX"]
    lines = text.splitlines()
    for rule in ignored:  # each exception carries its reason in the comment just above it
        i = next(n for n, line in enumerate(lines) if line.strip() == f"{rule}:")
        assert lines[i - 1].strip().startswith("#"), f"buf.yaml: no reason given for {rule}"
