"""Which checkpoint a resumed training (``--c``) or a validation (``--val``) really loads.

nnU-Net picks ``checkpoint_final.pth``, else ``checkpoint_latest.pth``, else ``checkpoint_best.pth`` by
existence alone, so a file cut off by a kill (or damaged in a copy) stops the run with an unpickling error.
``choose_checkpoint`` reads the picked file first; when it cannot be read, a resumed training continues from
the next readable one in that order, with one log line, and otherwise stops with a message that lists what
was found and what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["CHECKPOINT_ORDER", "UnreadableCheckpointError", "checkpoint_problem", "choose_checkpoint"]

CHECKPOINT_ORDER = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
_REQUIRED_KEYS = ("network_weights", "optimizer_state", "current_epoch")


class UnreadableCheckpointError(RuntimeError):
    """No checkpoint that the command may use can be read."""


def _read(path: Path) -> dict:
    try:  # mmap: the structure is unpickled and checked, tensor data is not read
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:
        return torch.load(path, map_location="cpu", weights_only=False)  # files without the zip layout


def checkpoint_problem(path: str | Path) -> tuple[str | None, int | None]:
    """``(None, epoch)`` for a readable nnU-Net checkpoint, else ``(why, None)`` in one line."""
    path = Path(path)
    if not path.is_file():
        return "no such file", None
    if path.stat().st_size == 0:
        return "the file is empty", None
    try:
        checkpoint = _read(path)
    except Exception as error:  # unpickling and zip errors come in many types
        why = (str(error).strip().splitlines() or ["unreadable"])[0].split(". ")[0].rstrip(".")
        return f"{type(error).__name__}: {why}", None
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in _REQUIRED_KEYS):
        return f"not a training checkpoint (it lacks {', '.join(_REQUIRED_KEYS)})", None
    return None, int(checkpoint["current_epoch"])


def _found(folder: Path) -> list[str]:
    lines = []
    for name in CHECKPOINT_ORDER:
        problem, epoch = checkpoint_problem(folder / name)
        if problem != "no such file":
            lines.append(f"  {name}: " + (f"readable, epoch {epoch}" if problem is None else f"unreadable ({problem})"))
    return lines or ["  no checkpoint files"]


def choose_checkpoint(picked: str | Path, continuing: bool, log: Callable[[str], None]) -> Path:
    """The checkpoint to load instead of ``picked`` (the one nnU-Net chose).

    With ``continuing`` (``--c``), an unreadable ``picked`` is skipped for the next readable file in
    ``CHECKPOINT_ORDER`` after it, and ``log`` gets one line naming the file and why. Without it (``--val``,
    ``--val_best``) only ``picked`` itself will do: validating another checkpoint would label the results with
    the wrong model. Raises ``UnreadableCheckpointError`` when nothing usable is readable.
    """
    picked = Path(picked)
    folder = picked.parent
    problem, _ = checkpoint_problem(picked)
    if problem is None:
        return picked
    if continuing and picked.name in CHECKPOINT_ORDER:
        for name in CHECKPOINT_ORDER[CHECKPOINT_ORDER.index(picked.name) + 1 :]:
            candidate_problem, epoch = checkpoint_problem(folder / name)
            if candidate_problem is None:
                log(
                    f"{picked.name} cannot be read ({problem}), probably cut off by a kill; "
                    f"continuing from {name} (epoch {epoch})"
                )
                return folder / name
        raise UnreadableCheckpointError(
            f"Cannot continue the training in {folder}: no checkpoint there can be read.\n"
            + "\n".join(_found(folder))
            + "\nThey were probably cut off by a kill or damaged in a copy. To keep the progress, put back a "
            "readable copy (from a backup) under one of these names and run the same command again. To train "
            f"from scratch, move them away first, e.g.\n    mkdir {folder / 'unreadable'} && "
            f"mv {folder}/checkpoint_*.pth {folder / 'unreadable'}/"
        )
    readable = [line for line in _found(folder) if ": readable" in line]
    if picked.name == "checkpoint_final.pth":
        fix = (
            "Run the same nnUNetv2_train command with --c instead of --val: the training continues from the last "
            "readable checkpoint, writes a new checkpoint_final.pth and validates it."
            if readable
            else "No checkpoint here can be read: restore the fold folder from a backup, or train it again "
            "(move the checkpoint files away first)."
        )
    else:
        fix = f"Put back a readable {picked.name} from a backup, or validate another checkpoint (without --val_best)."
    raise UnreadableCheckpointError(
        f"Cannot load {picked}: {problem}.\nCheckpoints in {folder}:\n" + "\n".join(_found(folder)) + f"\n{fix}"
    )
