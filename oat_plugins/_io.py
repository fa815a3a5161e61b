"""Atomic file writes: a crash never leaves a half-written checkpoint or result file."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _atomic_write(path: str | os.PathLike, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file lives in the target directory so that os.replace is a same-filesystem
    # rename, which POSIX guarantees to be atomic.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes (how a model card names the very file it describes)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same directory, then rename over ``path``."""
    return _atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return _atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(text.encode("utf-8"), path)
