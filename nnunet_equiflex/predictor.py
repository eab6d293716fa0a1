"""A mirror-symmetric sliding window for nnU-Net: exact mirror consistency for every image size.

nnU-Net's predictor is not mirror-symmetric even around an equivariant network, for four
reasons of its pipeline: an odd padding difference is split unevenly (``diff // 2`` before);
tile starts are rounded (``round(step * i)``); the Gaussian importance map is centred on pixel
``size // 2``, half a pixel off-centre for even tile sizes; and overlapping tiles are summed in
float16 in tile order, which mirroring reverses. The window here changes exactly these:

- pads so that every axis gets the same amount before and after (one extra row/column of
  padding when the difference is odd; the padding is cropped off again);
- places tiles so that ``start_i + start_{n-1-i} = size - tile`` (adding one tile where an odd
  count would put the middle tile on a half pixel);
- uses a Gaussian centred at ``(size - 1) / 2``;
- accumulates in float32.

Every step works per spatial axis, so the same functions serve 2D patches (also on the slices of a 3D
array, nnU-Net's 2d configuration) and 3D patches (3d_fullres, 8 flips of a volume): tests/test_nnunet_3d.py.
Everything else (preprocessing, export, multiprocessing, folds, TTA) is nnU-Net's own. The window is
three functions that stand in for nnUNetPredictor's methods of the same names; ``EquiFlexPredictor``
always uses them, and ``nnunet_equiflex.nnunet_patch`` makes nnU-Net's own predictor use them for our
networks.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_equiflex.atomic import remove_stale_partials


def symmetric_steps(image_size: int, tile_size: int, tile_step_size: float) -> list[int]:
    """Tile starts along one axis with ``start_i + start_{n-1-i} == image_size - tile_size``."""
    span = image_size - tile_size
    if span <= 0:
        return [0]
    n = math.ceil(span / (tile_step_size * tile_size)) + 1
    if n % 2 == 1 and span % 2 == 1:
        n += 1  # an odd count would centre a tile on a half pixel
    step = span / (n - 1)
    first_half = [math.floor(step * i) for i in range(n // 2)]
    middle = [span // 2] if n % 2 else []
    return first_half + middle + [span - s for s in reversed(first_half)]


def symmetric_gaussian(
    tile_size: tuple[int, ...], sigma_scale: float = 1.0 / 8, value_scaling_factor: float = 10, device=None
) -> torch.Tensor:
    """nnU-Net's importance map, but centred between pixels on even sizes."""
    axes = []
    for size in tile_size:
        coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        axes.append(torch.exp(-(coords**2) / (2 * (size * sigma_scale) ** 2)))
    gaussian = axes[0]
    for axis in axes[1:]:
        gaussian = gaussian[..., None] * axis
    gaussian = gaussian / gaussian.max() * value_scaling_factor
    return gaussian.float().clamp_min(gaussian[gaussian > 0].min().item()).to(device)


NNUNET_METHOD_ATTR = "_equiflex_nnunet_method"  # on nnunet_patch's wrappers: the nnU-Net method they wrap


def nnunet_method(name: str) -> Callable:
    """nnUNetPredictor's own method ``name``, also after ``nnunet_patch`` has wrapped it."""
    method = getattr(nnUNetPredictor, name)
    return getattr(method, NNUNET_METHOD_ATTR, method)


def symmetric_padding(spatial: tuple[int, ...], patch: tuple[int, ...]) -> list[int]:
    """Per axis, the padding before (and the same after) that makes the image at least one tile."""
    pads = []
    for size, tile in zip(spatial, patch):
        target = max(size, tile)
        target += (target - size) % 2
        pads.append((target - size) // 2)
    return pads


@torch.inference_mode()
def predict_sliding_window_return_logits(predictor: nnUNetPredictor, input_image: torch.Tensor) -> torch.Tensor:
    """Pad symmetrically, run nnU-Net's own window loop (which then needs no padding of its own), crop."""
    patch = tuple(predictor.configuration_manager.patch_size)
    spatial = input_image.shape[1:][-len(patch) :]
    pads = symmetric_padding(spatial, patch)
    if any(pads):
        flat = [p for pad in reversed(pads) for p in (pad, pad)]  # F.pad wants the last axis first
        padded = torch.nn.functional.pad(input_image, flat, mode="constant", value=0)
    else:
        padded = input_image
    logits = nnunet_method("predict_sliding_window_return_logits")(predictor, padded)
    crop = [slice(None)] * (logits.ndim - len(patch))
    crop += [slice(pad, pad + size) for pad, size in zip(pads, spatial)]
    return logits[tuple(crop)]


def get_sliding_window_slicers(predictor: nnUNetPredictor, image_size: tuple[int, ...]) -> list[tuple]:
    """Tiles at mirror-symmetric starts (``symmetric_steps``), in nnU-Net's slicer format."""
    patch = tuple(predictor.configuration_manager.patch_size)
    leading = image_size[: len(image_size) - len(patch)]  # 2D patches on 3D arrays: one slice at a time
    steps = [symmetric_steps(s, t, predictor.tile_step_size) for s, t in zip(image_size[len(leading) :], patch)]
    slicers = []
    for lead in itertools.product(*[range(n) for n in leading]):
        for starts in itertools.product(*steps):
            tiles = [slice(s, s + t) for s, t in zip(starts, patch)]
            slicers.append((slice(None), *lead, *tiles))
    return slicers


@torch.inference_mode()
def predict_tiles_return_logits(
    predictor: nnUNetPredictor, data: torch.Tensor, slicers: list[tuple], do_on_device: bool = True
) -> torch.Tensor:
    """The Gaussian-weighted sum of the tile predictions, centred Gaussian, float32."""
    results_device = predictor.device if do_on_device else torch.device("cpu")
    data = data.to(results_device)
    patch = tuple(predictor.configuration_manager.patch_size)
    logits = torch.zeros(
        (predictor.label_manager.num_segmentation_heads, *data.shape[1:]), dtype=torch.float32, device=results_device
    )
    weights = torch.zeros(data.shape[1:], dtype=torch.float32, device=results_device)
    if predictor.use_gaussian:
        gaussian = symmetric_gaussian(patch, device=results_device)
    else:
        gaussian = torch.ones(patch, device=results_device)
    for sl in slicers:
        tile = data[sl][None].to(predictor.device)
        prediction = predictor._internal_maybe_mirror_and_predict(tile)[0].to(results_device, torch.float32)
        logits[sl] += prediction.reshape(logits[sl].shape) * gaussian.reshape(weights[sl[1:]].shape)
        weights[sl[1:]] += gaussian.reshape(weights[sl[1:]].shape)
    return logits / weights


# nnUNetPredictor's method name -> the function that replaces it in the mirror-symmetric window.
SYMMETRIC_WINDOW = {
    "predict_sliding_window_return_logits": predict_sliding_window_return_logits,
    "_internal_get_sliding_window_slicers": get_sliding_window_slicers,
    "_internal_predict_sliding_window_return_logits": predict_tiles_return_logits,
}


class EquiFlexPredictor(nnUNetPredictor):
    """nnUNetPredictor with a mirror-symmetric sliding window for every network (see the module docstring)."""

    predict_sliding_window_return_logits = predict_sliding_window_return_logits
    _internal_get_sliding_window_slicers = get_sliding_window_slicers
    _internal_predict_sliding_window_return_logits = predict_tiles_return_logits

    def _manage_input_and_output_lists(
        self, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files, *args, **kwargs
    ):
        """Before nnU-Net lists what is left to predict, delete the partial files of killed runs (see
        ``nnunet_equiflex.atomic_export``); they never count as outputs, but should not pile up."""
        outputs = output_folder_or_list_of_truncated_output_files
        folders = {outputs} if isinstance(outputs, str) else {os.path.dirname(o) for o in outputs or []}
        for folder in folders:
            remove_stale_partials(folder)
        return super()._manage_input_and_output_lists(list_of_lists_or_source_folder, outputs, *args, **kwargs)


def predict_entry_point() -> None:
    """``nnunet-equiflex predict``: nnUNetv2_predict's exact command line, with EquiFlexPredictor."""
    import nnunetv2.inference.predict_from_raw_data as nnunet_predict

    from nnunet_equiflex.atomic_export import install_atomic_exports

    nnunet_predict.nnUNetPredictor = EquiFlexPredictor  # this process only; the entry point reads the name
    install_atomic_exports(nnunet_predict)  # each case's files appear complete or not at all
    nnunet_predict.predict_entry_point()
