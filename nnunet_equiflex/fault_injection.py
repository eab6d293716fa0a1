"""Test-only switches that hold a write half-way, so a fault test can kill the process inside it.

Each switch is an environment variable holding a shell pattern (``fnmatch``) of the names to hold; unset, the
code paths are unchanged. A held write prints one ``EQUIFLEX_FAULT_TEST`` line and sleeps until killed (at most
``PAUSE_SECONDS``), then finishes normally.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import time
from typing import BinaryIO

__all__ = ["CHECKPOINT_PAUSE_ENV", "EXPORT_PAUSE_ENV", "PAUSE_SECONDS", "checkpoint_stream", "maybe_pause_export"]

CHECKPOINT_PAUSE_ENV = "EQUIFLEX_FAULT_TEST_PAUSE_CHECKPOINT"  # checkpoint file names, e.g. checkpoint_final.pth
EXPORT_PAUSE_ENV = "EQUIFLEX_FAULT_TEST_PAUSE_EXPORT"  # case names of nnunet-equiflex predict, e.g. toy_005
PAUSE_SECONDS = 600
_HOLD_AFTER_BYTES = 64 * 1024


def _wants(env: str, name: str) -> bool:
    pattern = os.environ.get(env, "")
    return bool(pattern) and fnmatch.fnmatchcase(name, pattern)


def _hold(message: str) -> None:
    print(f"EQUIFLEX_FAULT_TEST: {message}; holding for {PAUSE_SECONDS} s", flush=True)
    sys.stderr.flush()
    time.sleep(PAUSE_SECONDS)


class _HoldingWriter:
    """A file wrapper that holds once, after the first 64 KiB (or at the end of a smaller file) are on disk."""

    def __init__(self, f: BinaryIO, name: str):
        self._f, self._name, self._written, self._held = f, name, 0, False

    def _maybe_hold(self) -> None:
        if not self._held:
            self._held = True
            self._f.flush()
            os.fsync(self._f.fileno())
            _hold(f"writing {self._name}, {self._written} bytes on disk")

    def write(self, data) -> int:
        n = self._f.write(data)
        self._written += n
        if self._written >= _HOLD_AFTER_BYTES:
            self._maybe_hold()
        return n

    def flush(self) -> None:
        self._maybe_hold()
        self._f.flush()


def checkpoint_stream(f: BinaryIO, name: str) -> BinaryIO:
    """``f``, or a wrapper that holds the write of checkpoint ``name`` when ``CHECKPOINT_PAUSE_ENV`` matches."""
    return _HoldingWriter(f, name) if _wants(CHECKPOINT_PAUSE_ENV, name) else f


def maybe_pause_export(case: str) -> None:
    """Hold between writing case ``case``'s outputs under their partial names and renaming them."""
    if _wants(EXPORT_PAUSE_ENV, case):
        _hold(f"exported {case} under partial names, not yet renamed")
