"""How nnU-Net finds our trainers: the ``nnUNet_extTrainer`` line, or a guarded shim module.

nnunetv2 >= 2.8 scans the folders in ``nnUNet_extTrainer``; older versions only search their
own trainer folder, where ``install_shim`` puts one small module that re-exports our trainers.
The shim is guarded (an import failure becomes a warning), so it can never break nnU-Net's
lookup of its own trainers, and ``uninstall_shim`` removes exactly what was installed.
"""

from __future__ import annotations

import os
from pathlib import Path

SHIM_NAME = "nnunet_equiflex_shim.py"
SHIM_MARKER = "# nnunet-equiflex shim"
SHIM_SOURCE = f"""{SHIM_MARKER}: lets nnU-Net find the EquiFlex trainers without nnUNet_extTrainer.
# Installed by `nnunet-equiflex install-trainers`; remove it with `nnunet-equiflex uninstall-trainers`.
try:
    from nnunet_equiflex.trainers.equiflex_trainers import *  # noqa: F401,F403
except Exception as error:  # never break nnU-Net's lookup of its own trainers
    import warnings

    warnings.warn(
        f"nnunet-equiflex trainers are unavailable ({{error!r}}); reinstall nnunet-equiflex or run "
        "`nnunet-equiflex uninstall-trainers`",
        stacklevel=1,
    )
"""


def trainers_dir() -> Path:
    """The folder to put in ``nnUNet_extTrainer`` (``trainers/`` of this installation)."""
    import nnunet_equiflex.trainers

    return Path(nnunet_equiflex.trainers.__path__[0]).resolve()


def export_line() -> str:
    """A shell line that adds our trainers folder to ``nnUNet_extTrainer``, keeping other entries."""
    ours = str(trainers_dir())
    existing = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    paths = existing if ours in existing else existing + [ours]
    return f'export nnUNet_extTrainer="{os.pathsep.join(paths)}"'


def nnunet_trainer_dir() -> Path:
    import nnunetv2

    return Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"


def install_shim(target_dir: Path | None = None) -> Path:
    target = (target_dir or nnunet_trainer_dir()) / SHIM_NAME
    if target.exists() and SHIM_MARKER not in target.read_text():
        raise FileExistsError(f"{target} exists and was not written by nnunet-equiflex; not touching it")
    tmp = target.with_suffix(".tmp")
    tmp.write_text(SHIM_SOURCE)
    os.replace(tmp, target)
    return target


def uninstall_shim(target_dir: Path | None = None) -> list[Path]:
    """Remove the shim and its compiled copies; return what was removed."""
    folder = target_dir or nnunet_trainer_dir()
    target = folder / SHIM_NAME
    removed = []
    if target.exists():
        if SHIM_MARKER not in target.read_text():
            raise FileExistsError(f"{target} was not written by nnunet-equiflex; not removing it")
        target.unlink()
        removed.append(target)
    for compiled in (folder / "__pycache__").glob(f"{Path(SHIM_NAME).stem}.*.pyc"):
        compiled.unlink()
        removed.append(compiled)
    return removed
