"""Atomic file writes: a crash never leaves a half-written file behind a valid name."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".partial") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``, on
    any exception delete it. For writers that want a file name (safetensors' ``save_file``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | Path, suffix: str = ".partial"):
    """Like :func:`atomic_path`, but yield the temporary file opened for binary writing (seekable)."""
    with atomic_path(path, suffix) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()
