"""Folders written whole or not at all: cached build products and finished artifacts."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def filled(folder: Path, prefix: str) -> Iterator[Path]:
    """A fresh work folder beside ``folder``; once the block succeeds it replaces ``folder``, if it fails it is
    removed. A reader of ``folder`` (a cache) never sees it half written."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=folder.parent))
    try:
        yield work
        if folder.exists():
            shutil.rmtree(folder)
        work.rename(folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def publish(tmp: Path, out: Path) -> None:
    """Moves the finished folder ``tmp`` to ``out`` (replacing it by renames), with the umask's permissions
    (``mkdtemp`` makes it 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
