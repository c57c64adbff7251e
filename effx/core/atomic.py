"""Atomic outputs: write into a temporary sibling, rename into place when complete.

A failure or Ctrl-C leaves nothing at the destination (and removes the temporary folder)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from effx.core.errors import OutputPathError


def check_output_dir(out: Path, overwrite: bool = False) -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{out} is a file, not a folder; choose another -o")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputPathError(f"{out} exists and is not empty; pass --overwrite or choose another -o")
    parent = out.resolve().parent
    if parent.exists() and not os.access(parent, os.W_OK):
        raise OutputPathError(f"cannot write in {parent} (no permission); choose another -o")


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it replaces `out`, on any failure it is removed."""
    out = Path(out)
    check_output_dir(out, overwrite)
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as exc:
        raise OutputPathError(f"cannot create {out} ({exc.strerror}); choose another -o") from None
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{path} is a folder; give a file name with -o")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise OutputPathError(f"cannot write {path} ({exc.strerror}); choose another -o") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
