"""Files that are either complete or absent: written under a hidden partial name, then renamed.

A process killed while writing leaves at most a *partial* file: hidden (leading dot), in the same folder as
the file it was to become (so ``os.replace`` is an atomic rename on the same filesystem), named after it and
after the host and process that wrote it, e.g. ``.checkpoint_best.pth.equiflex-partial.node1.4711``. Such a
file never has the name of an output, so nothing that looks for outputs mistakes it for one;
``remove_stale_partials`` deletes the ones whose writer has died. Checkpoints of the trainers and the outputs
of ``nnunet-equiflex predict`` are written this way.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "PARTIAL_MARK",
    "atomic_write",
    "fsync_dir",
    "fsync_file",
    "is_partial",
    "partial_path",
    "publish",
    "remove_stale_partials",
]

PARTIAL_MARK = ".equiflex-partial"
_PARTIAL_RE = re.compile(r"^\.(?P<name>.+)" + re.escape(PARTIAL_MARK) + r"\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def partial_path(path: str | os.PathLike, suffix: str = "") -> Path:
    """The hidden name that ``path`` is written under until it is complete. ``suffix`` goes last, for
    writers that pick the format from the extension (``.nii.gz``) or append one themselves (``.npz``)."""
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL_MARK}.{_host()}.{os.getpid()}{suffix}")


def is_partial(name: str) -> bool:
    return _PARTIAL_RE.match(name) is not None


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in ``path`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on folders; the rename itself is still atomic
    finally:
        os.close(fd)


def publish(partial: str | os.PathLike, final: str | os.PathLike, sync_dir: bool = True) -> None:
    """Flush ``partial`` to disk and rename it onto ``final`` in one step."""
    fsync_file(partial)
    os.replace(partial, final)
    if sync_dir:
        fsync_dir(Path(final).parent)


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open ``path`` for binary writing; it appears (or is replaced) only when the block ends without error.
    A reader sees the old file or the new one, never a part of either."""
    final = Path(path)
    partial = partial_path(final)
    try:
        with open(partial, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def _process_alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # os.kill(pid, 0) would signal the process there; keep its files (they are ignored anyway)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process whose parent died may stay a zombie where nobody reaps it (containers)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def remove_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Delete the partial files in ``folder`` left by dead processes of this host; files of processes that
    are still writing (another part of a split prediction) and of other hosts stay. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host = _host()
    removed = []
    for entry in folder.iterdir():
        match = _PARTIAL_RE.match(entry.name)
        if match is None or match["host"] != host or _process_alive(int(match["pid"])):
            continue
        try:
            entry.unlink()
        except FileNotFoundError:
            continue  # another process cleaned it first
        removed.append(entry)
    return removed
