"""Owner-only files and directories, no writing through links, whole-record appends (standard library only)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["LinkError", "append_line", "private_makedirs", "read_jsonl", "refuse_link"]


class LinkError(OSError):
    """memwatch was asked to write through a symbolic link (which could point anywhere): refused."""


def refuse_link(path: str | os.PathLike[str], what: str) -> None:
    """LinkError if `path` is a symbolic link: memwatch never writes through one (a link planted in an output
    directory would redirect a write, and a chmod, to its target)."""
    if os.path.islink(path):
        raise LinkError(
            f"{what} {os.fspath(path)} is a symbolic link; memwatch does not write through links. Remove the link "
            "or choose another output_dir."
        )


def private_makedirs(path: str | os.PathLike[str]) -> str:
    """Create `path` and any missing parents owner-only (0700, whatever the umask); existing ones are left as they
    are. A component that exists as a file, or a leaf that is a link, is a clear error."""
    path = os.path.abspath(os.fspath(path))
    missing = []
    head = path
    while not os.path.exists(head):
        missing.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    if os.path.exists(head) and not os.path.isdir(head):
        raise NotADirectoryError(f"{head} is a file, not a directory: choose another output_dir")
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:  # created concurrently (another rank, another run)
            continue
        os.chmod(d, 0o700)  # mkdir's mode is masked by the umask; owner-only is the point
    refuse_link(path, "the directory")
    return path


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append one line to a private (0600) file: written whole or not at all (on a full disk the partial bytes are
    cut off again, so the next append never lands in the middle of a torn record), never through a link."""
    data = line.rstrip("\n").encode() + b"\n"
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if os.path.islink(path):
            raise LinkError(
                f"{os.fspath(path)} is a symbolic link; memwatch does not write through links"
            ) from exc
        raise
    try:
        os.fchmod(fd, 0o600)  # a file that already existed keeps its mode under O_CREAT: make it private too
        start = os.fstat(fd).st_size
        written = 0
        try:
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The records of a JSON-lines file. A last line without its newline that does not parse is a write cut short
    (a killed process) and is skipped; a damaged line anywhere else raises."""
    with open(path, encoding="utf-8", errors="replace") as f:
        complete, _, tail = f.read().rpartition("\n")
    for line in complete.split("\n"):
        if line.strip():
            yield json.loads(line)
    if tail.strip():
        try:
            yield json.loads(tail)
        except json.JSONDecodeError:
            return
