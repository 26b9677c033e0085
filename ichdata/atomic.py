"""Write a file so that readers see the old one or the whole new one, never a part.

`atomic_path` hands out a temporary name beside the target, renames it over the target when the
block ends without error, and removes it otherwise (a full disk leaves no `.tmp` files behind, and
the error names the target, `ichdata.errors.out_of_space`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`, renamed over `path` (after a chmod to `mode`) on success.

    The temporary name is hidden and unique per process and thread, so concurrent writers of the same
    target never share one.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as exc:
        # A failed write names no file, or the hidden temporary one: the user knows the target.
        if exc.filename is None or os.fspath(exc.filename) == os.fspath(tmp):
            exc.filename = os.fspath(target)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int | None = None) -> None:
    """`Path(path).write_bytes(data)`, atomically (see `atomic_path`)."""
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str, *, mode: int | None = None) -> None:
    """`Path(path).write_text(text)` in UTF-8, atomically (see `atomic_path`)."""
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_text(text, encoding="utf-8")


__all__ = ["atomic_path", "write_bytes_atomic", "write_text_atomic"]
