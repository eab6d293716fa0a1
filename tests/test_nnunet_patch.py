"""nnU-Net's own predictor, patched by our trainer module: the symmetric window for our networks only."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from torch import nn

import nnunet_equiflex.trainers.equiflex_trainers  # noqa: F401  what nnU-Net imports; installs the patch
from helpers import tiny_network
from nnunet_equiflex import nnunet_patch
from nnunet_equiflex.predictor import SYMMETRIC_WINDOW, EquiFlexPredictor

PATCH = (48, 48)
# Smaller and larger than the patch, odd and even, one to four tiles per axis.
SIZES = [(41, 46), (48, 48), (53, 47), (64, 70), (81, 50)]


@pytest.fixture
def reinstall():
    """For tests that take the patch off: the rest of the session runs as before, as after nnU-Net's import."""
    installed = nnunet_patch.is_installed()
    yield
    nnunet_patch.uninstall()
    if installed:
        nnunet_patch._wrap_methods()


def _predictor(network: nn.Module, predictor_class=nnUNetPredictor) -> nnUNetPredictor:
    predictor = predictor_class(
        tile_step_size=0.5,
        use_mirroring=False,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    # What manual_initialization sets, without plans: only the patch size and the number of outputs are read.
    predictor.network = network.eval()
    predictor.configuration_manager = types.SimpleNamespace(patch_size=list(PATCH))
    predictor.label_manager = types.SimpleNamespace(num_segmentation_heads=3)
    predictor.allowed_mirroring_axes = None
    return predictor


def _flip_errors(predictor, size) -> list[float]:
    # nnU-Net's layout for a 2D configuration: (channels, 1, H, W)
    x = torch.randn(1, 1, *size, generator=torch.Generator().manual_seed(sum(size)))
    logits = predictor.predict_sliding_window_return_logits(x)
    assert logits.shape == (3, 1, *size)
    errors = []
    for axes in [(2,), (3,), (2, 3)]:
        flipped = predictor.predict_sliding_window_return_logits(x.flip(axes))
        errors.append((flipped - logits.flip(axes)).abs().max().item())
    return errors


def _cnn(flip_symmetric: bool = False) -> nn.Module:
    """A small CNN; with ``flip_symmetric`` its kernels are mirror-symmetric, so it is flip-equivariant."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
    if flip_symmetric:
        with torch.no_grad():
            for conv in (net[0], net[2]):
                w = conv.weight
                w.copy_((w + w.flip(-1) + w.flip(-2) + w.flip(-1, -2)) / 4)
    return net


def test_importing_the_trainer_module_installs_the_patch_once():
    assert nnunet_patch.is_installed()
    before = {name: getattr(nnUNetPredictor, name) for name in SYMMETRIC_WINDOW}
    assert nnunet_patch.install()  # a second import of the trainer module (nnU-Net re-imports it per lookup)
    assert {name: getattr(nnUNetPredictor, name) for name in SYMMETRIC_WINDOW} == before
    for name, method in before.items():
        assert method.__name__ == name and method.__wrapped__.__module__ == "nnunetv2.inference.predict_from_raw_data"


@pytest.mark.parametrize("size", SIZES)
def test_nnunet_predictor_is_flip_exact_for_our_network(size):
    predictor = _predictor(tiny_network(in_channels=1))
    assert nnunet_patch.uses_symmetric_window(predictor)
    assert max(_flip_errors(predictor, size)) < 1e-5  # the network's own float rounding; nnU-Net's window: ~1e-1


def test_wrapped_networks_are_recognised():
    net = tiny_network(in_channels=1)
    assert nnunet_patch.is_equiflex_network(torch.compile(net))  # what nnU-Net_compile=1 and the trainer on CUDA do
    assert not nnunet_patch.is_equiflex_network(torch.compile(_cnn()))
    assert not nnunet_patch.is_equiflex_network(None)


def test_other_networks_take_nnunets_path_bit_for_bit(reinstall):
    x = torch.randn(1, 1, 53, 70)
    predictor = _predictor(_cnn())
    assert not nnunet_patch.uses_symmetric_window(predictor)
    patched = predictor.predict_sliding_window_return_logits(x)
    nnunet_patch.uninstall()
    assert getattr(nnUNetPredictor.predict_sliding_window_return_logits, "__module__", "").startswith("nnunetv2")
    assert torch.equal(patched, predictor.predict_sliding_window_return_logits(x))
    assert patched.dtype == torch.float16  # nnU-Net's own accumulation buffer


def test_switch_off_gives_nnunets_window_which_is_not_flip_exact(reinstall, monkeypatch):
    predictor = _predictor(tiny_network(in_channels=1))
    x = torch.randn(1, 1, 53, 47)
    monkeypatch.setenv(nnunet_patch.SWITCH_ENV, "0")
    assert not nnunet_patch.uses_symmetric_window(predictor)
    switched_off = predictor.predict_sliding_window_return_logits(x)
    errors = _flip_errors(predictor, (53, 47))
    nnunet_patch.uninstall()
    assert torch.equal(switched_off, predictor.predict_sliding_window_return_logits(x))
    assert max(errors) > 1e-2  # odd padding differences: a one-pixel shift against the token grid


def test_switch_off_at_import_leaves_nnunet_untouched(reinstall, monkeypatch):
    nnunet_patch.uninstall()
    monkeypatch.setenv(nnunet_patch.SWITCH_ENV, "off")
    assert not nnunet_patch.install()
    assert not any(hasattr(getattr(nnUNetPredictor, n), "_equiflex_nnunet_method") for n in SYMMETRIC_WINDOW)


def test_untested_nnunet_version_warns_once_and_keeps_nnunets_predictor(reinstall, monkeypatch):
    nnunet_patch.uninstall()
    monkeypatch.setattr(nnunet_patch, "_nnunet_version", lambda: "9.9.9")
    monkeypatch.setattr(nnunet_patch, "_warned", False)
    with pytest.warns(UserWarning, match=r"nnunetv2 9\.9\.9 is not a version .* tested with \(2\.8\.1\).*=0"):
        assert not nnunet_patch.install()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not nnunet_patch.install()  # the second import of the trainer module stays quiet
    assert not nnunet_patch.is_installed()
    predictor = _predictor(tiny_network(in_channels=1))
    assert not nnunet_patch.uses_symmetric_window(predictor)


@pytest.mark.parametrize("size", [(53, 47), (81, 50)])
def test_equiflex_predictor_and_patched_nnunet_predictor_agree_exactly(size):
    net = tiny_network(in_channels=1)
    x = torch.randn(1, 1, *size)
    ours = _predictor(net, EquiFlexPredictor).predict_sliding_window_return_logits(x)
    assert torch.equal(ours, _predictor(net).predict_sliding_window_return_logits(x))


def test_equiflex_predictor_uses_the_symmetric_window_for_any_network(monkeypatch):
    monkeypatch.setenv(nnunet_patch.SWITCH_ENV, "0")  # the switch is about nnU-Net's predictor only
    predictor = _predictor(_cnn(flip_symmetric=True), EquiFlexPredictor)
    assert nnunet_patch.uses_symmetric_window(predictor)
    assert max(_flip_errors(predictor, (53, 47))) < 1e-5
