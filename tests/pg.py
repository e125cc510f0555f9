"""A real PostgreSQL for the tests (pytest plugin, registered in conftest.py).

``BUNDLEREC_TEST_PG_DSN`` names a running server (``.ci/run`` starts one with ``scripts/pg.sh``;
``BUNDLEREC_TEST_PG_DIR``, which it exports too, lets tests restart it). Without it, a throwaway cluster
is started here with ``scripts/pg.sh`` and removed at the end. Tests are skipped only when no PostgreSQL
binary exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "pg.sh"
NO_BINARY = 3  # pg.sh's exit status when no initdb/pg_ctl exists


class PgCluster:
    """A PostgreSQL server: ``dir`` set when this machine can stop/start it through scripts/pg.sh."""

    def __init__(self, dsn: str, dir: Path | None = None, owned: bool = False) -> None:
        self.dsn, self.dir, self.owned = dsn, dir, owned

    @classmethod
    def start_new(cls) -> PgCluster:
        from conftest import free_port

        root = Path(tempfile.mkdtemp(prefix="bundlerec-pg-"))
        done = _pg("start", root, str(free_port()))
        if done.returncode == NO_BINARY:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip("no PostgreSQL binary (initdb/pg_ctl) on this machine: the PostgreSQL event store tests need one "
                        "(or set BUNDLEREC_TEST_PG_DSN to a running server)")
        if done.returncode != 0:
            raise RuntimeError(f"scripts/pg.sh start failed: {done.stderr}")
        return cls(_pg("dsn", root).stdout.strip(), root, owned=True)

    def stop(self) -> None:
        assert self.dir is not None
        _pg("stop", self.dir, check=True)

    def start(self) -> None:
        assert self.dir is not None
        _pg("start", self.dir, check=True)

    def database(self) -> str:
        """A fresh, empty database on this server; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return urlsplit(self.dsn)._replace(path="/" + name).geturl()

    def remove(self) -> None:
        if self.owned and self.dir is not None:
            _pg("stop", self.dir)
            shutil.rmtree(self.dir, ignore_errors=True)


def _pg(cmd: str, root: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), cmd, str(root), *args], capture_output=True, text=True, check=check, timeout=120)


@pytest.fixture(scope="session")
def postgres():
    dsn = os.environ.get("BUNDLEREC_TEST_PG_DSN")
    if dsn:
        pg_dir = os.environ.get("BUNDLEREC_TEST_PG_DIR")
        yield PgCluster(dsn, Path(pg_dir) if pg_dir else None)
        return
    cluster = PgCluster.start_new()
    yield cluster
    cluster.remove()


@pytest.fixture()
def pg_dsn(postgres) -> str:
    """A fresh database for one test: tests never see each other's events."""
    return postgres.database()


@pytest.fixture()
def restartable_postgres(postgres):
    """A server this test may stop and start: the session's if it is local, else a private one."""
    if postgres.dir is not None:
        yield postgres
        return
    cluster = PgCluster.start_new()
    yield cluster
    cluster.remove()
