"""Output folders: the one rule every command follows, and atomic writes.

effx writes a command's output only into a folder that is absent, empty, or an earlier output of the same
command, recognised by the marker file effx leaves in every folder it writes (`.effx-output.json`: the
command, the effx version and the files it wrote). Anything else is refused with one line naming the
folder and the way out; `--overwrite` replaces an earlier effx output of the same command, never a folder
effx did not write, and never one where something was added after effx wrote it. Resumable commands
(`effx bench`, `effx adapt --resume`, `effx matrix`) continue into their own earlier output.

Folders are written into a temporary sibling and renamed into place when complete: a failure or Ctrl-C
leaves the destination as it was (and removes the temporary folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from effx import __version__
from effx.core.errors import OutputPathError

MARKER = ".effx-output.json"
Mode = Literal["new", "replace", "resume"]


def read_marker(folder: Path) -> dict | None:
    """The marker effx left in `folder`, or None (not an effx output, or an unreadable marker)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("command"), str) else None


def _files(folder: Path) -> list[str]:
    """Files below `folder` (relative, posix), not descending into folders that are effx outputs of their own
    (a stage's output inside `effx run`'s) and leaving out the marker itself."""
    out = []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            if read_marker(entry) is None:
                out += [f"{entry.name}/{f}" for f in _files(entry)]
        elif entry.name != MARKER:
            out.append(entry.name)
    return out


def _foreign_files(folder: Path, marker: dict) -> list[str]:
    """Files of an effx output that effx did not write there (added later by someone else)."""
    written = set(marker.get("files", []))
    return [f for f in _files(folder) if f not in written]


def check_output_dir(out: Path, command: str, overwrite: bool = False, resumable: bool = False) -> Mode:
    """Whether effx may write `command`'s output at `out`: "new" (absent or empty), "replace" (an earlier
    output of the command, with --overwrite) or "resume" (an earlier output of a resumable command).
    Anything else raises OutputPathError before any work starts."""
    out = Path(out)
    flag = f"effx {command}"
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{out} is a file, not a folder; choose another -o")
    parent = out.resolve().parent
    if parent.exists() and not os.access(parent, os.W_OK):
        raise OutputPathError(f"cannot write in {parent} (no permission); choose another -o")
    if not out.exists() or not any(out.iterdir()):
        return "new"
    marker = read_marker(out)
    if marker is None:
        raise OutputPathError(f"{out} is not empty and effx did not write it; choose another -o (effx never "
                              "replaces a folder it did not write)")
    if marker["command"] != command:
        raise OutputPathError(f"{out} holds the output of `effx {marker['command']}`, not of `{flag}`; "
                              "choose another -o")
    foreign = _foreign_files(out, marker)
    if foreign:
        raise OutputPathError(f"{out} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which "
                              f"effx did not write; move it away or choose another -o")
    if resumable and not overwrite:
        return "resume"
    if not overwrite:
        raise OutputPathError(f"{out} holds an earlier `{flag}` output; pass --overwrite to replace it or "
                              "choose another -o")
    return "replace"


def write_marker(folder: Path, command: str) -> None:
    """Mark `folder` as `command`'s output, listing the files in it now (what effx wrote)."""
    folder = Path(folder)
    data = {"effx_output": 1, "command": command, "effx": __version__, "files": _files(folder)}
    (folder / MARKER).write_text(json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def atomic_dir(out: Path, command: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it becomes `out` (marked as `command`'s output,
    replacing an earlier one only when check_output_dir allows it), on any failure it is removed."""
    out = Path(out)
    check_output_dir(out, command, overwrite)
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as exc:
        raise OutputPathError(f"cannot create {out} ({exc.strerror}); choose another -o") from None
    try:
        yield tmp
        write_marker(tmp, command)
        check_output_dir(out, command, overwrite)  # nothing foreign appeared meanwhile
        old = None
        if out.exists():  # set the earlier output aside, put the new one in place, then delete the old one
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
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
