"""Make nnU-Net's own predictor use the mirror-symmetric sliding window for our networks.

Users predict with ``nnUNetv2_predict``, and nnU-Net validates every fold with its own
``nnUNetPredictor`` (end of training, ``nnUNetv2_train --val``). Its sliding window is not
mirror-symmetric (``nnunet_equiflex/predictor.py`` says why), so even an exactly equivariant
network is not exactly flip-consistent through it. Importing this module replaces three methods of
``nnUNetPredictor`` by wrappers that, when the predictor's network is an ``EquiFlexFormer`` (also
inside ``torch.compile`` or DDP), run the window of ``nnunet_equiflex.predictor``, and otherwise
call nnU-Net's own method with the same arguments: every other network's path is nnU-Net's code.

Our trainer module imports this module; nnU-Net imports the trainer module in every process that
builds one of our networks (``recursive_find_trainer_class_by_name``, from ``nnUNetv2_train``,
``nnUNetv2_predict`` and ``initialize_from_trained_model_folder``) before any prediction, and the
validation of ``nnUNetv2_train`` runs in that same process. Sub-processes only preprocess and export.

Guards: the patch is installed only for nnunetv2 versions whose predictor internals it was tested
against (``TESTED_NNUNET_VERSIONS``; otherwise one warning and nnU-Net's behaviour), at most once per
process, and ``EQUIFLEX_SYMMETRIC_PREDICTOR=0`` switches it off (read at install and at every
prediction). ``uninstall()`` restores nnU-Net's methods.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import warnings
from collections.abc import Callable

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from torch import nn

from nnunet_equiflex.network import EquiFlexFormer, unwrap_network
from nnunet_equiflex.predictor import NNUNET_METHOD_ATTR, SYMMETRIC_WINDOW

__all__ = [
    "SWITCH_ENV",
    "TESTED_NNUNET_VERSIONS",
    "install",
    "uninstall",
    "is_installed",
    "switched_on",
    "is_equiflex_network",
    "unwrap_network",
    "uses_symmetric_window",
]

SWITCH_ENV = "EQUIFLEX_SYMMETRIC_PREDICTOR"
TESTED_NNUNET_VERSIONS = ("2.8.1",)
_OFF = ("0", "false", "no", "off")
_warned = False


def switched_on() -> bool:
    """False when ``EQUIFLEX_SYMMETRIC_PREDICTOR`` is 0 / false / no / off."""
    return os.environ.get(SWITCH_ENV, "1").strip().lower() not in _OFF


def is_equiflex_network(network: nn.Module | None) -> bool:
    return network is not None and isinstance(unwrap_network(network), EquiFlexFormer)


def uses_symmetric_window(predictor: nnUNetPredictor) -> bool:
    """Whether ``predictor`` runs the mirror-symmetric window (with its current network and the switch)."""
    if all(getattr(type(predictor), name) is function for name, function in SYMMETRIC_WINDOW.items()):
        return True  # EquiFlexPredictor: always
    return is_installed() and switched_on() and is_equiflex_network(predictor.network)


def _dispatch(original: Callable, symmetric: Callable) -> Callable:
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        if switched_on() and is_equiflex_network(self.network):
            return symmetric(self, *args, **kwargs)
        return original(self, *args, **kwargs)

    setattr(method, NNUNET_METHOD_ATTR, original)
    return method


def _wrapped(name: str) -> bool:
    return hasattr(getattr(nnUNetPredictor, name), NNUNET_METHOD_ATTR)


def is_installed() -> bool:
    """Whether nnUNetPredictor's window methods are our wrappers."""
    return all(_wrapped(name) for name in SYMMETRIC_WINDOW)


def _nnunet_version() -> str:
    try:
        return importlib.metadata.version("nnunetv2")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def install() -> bool:
    """Wrap nnUNetPredictor's window methods (once); return whether the patch is in place."""
    global _warned
    if is_installed():
        return True
    if not switched_on():
        return False
    version = _nnunet_version()
    if version not in TESTED_NNUNET_VERSIONS:
        if not _warned:
            _warned = True
            warnings.warn(
                f"nnunet-equiflex: nnunetv2 {version} is not a version its mirror-symmetric sliding window was "
                f"tested with ({', '.join(TESTED_NNUNET_VERSIONS)}), so nnU-Net's predictor runs unchanged: the "
                "prediction of a flipped image can differ from the flipped prediction in a few pixels. Install "
                f"nnunetv2=={TESTED_NNUNET_VERSIONS[-1]} for exact flips, or set {SWITCH_ENV}=0 to silence this "
                "warning.",
                stacklevel=2,
            )
        return False
    _wrap_methods()
    return True


def _wrap_methods() -> None:
    for name, symmetric in SYMMETRIC_WINDOW.items():
        if not _wrapped(name):
            setattr(nnUNetPredictor, name, _dispatch(getattr(nnUNetPredictor, name), symmetric))


def uninstall() -> None:
    """Put nnU-Net's own methods back."""
    for name in SYMMETRIC_WINDOW:
        if _wrapped(name):
            setattr(nnUNetPredictor, name, getattr(getattr(nnUNetPredictor, name), NNUNET_METHOD_ATTR))


install()
