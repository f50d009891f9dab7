"""Atomic file writes with ordinary permissions: the one writer behind every file skipprofiler produces.

A reader never sees half a file: data goes to a temp file in the target's folder (so the rename stays on one file
system), is fsynced, then `os.replace`d over the target. `tempfile.mkstemp` creates that temp file 0600; left as
is, every plan, profile, JSON and PNG would be private whatever the user's umask, so the mode is reset to
`0o666 & ~umask`, what `open(path, "w")` would have given. Standard library only: the runtime may import this.
"""

from __future__ import annotations

import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux publishes it (/proc, kernel >= 4.7)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # Elsewhere the only way is set-and-restore. Another thread creating a file in that instant gets the temporary
    # mask, so use the strictest one: such a file comes out too private, never too open.
    with _umask_lock:
        old = os.umask(0o077)
        os.umask(old)
    return old


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path` for writers that need a file name (safetensors, savefig); on a clean exit
    it becomes `path`, on any exception it is removed and `path` is left as it was."""
    path = Path(path)
    # The temp name keeps the target's suffix: savefig picks the image format from it.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(tmp)  # before the rename: after a crash the target holds the old or the new data, never a hole
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Encoded here rather than through a text-mode file, so the bytes are the same on every platform."""
    return write_bytes_atomic(path, text.encode(encoding))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDWR)  # Windows' fsync needs a writable handle
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
