"""End-to-end time per case through nnU-Net's predictor: EquiFlex (one pass per tile) vs the CNN.

Both networks run inside ``nnUNetPredictor.predict_single_npy_array`` (preprocessing, Gaussian
sliding window, resampling back, argmax), initialised with ``manual_initialization`` from an
in-memory 2D plan whose architecture entry is what nnU-Net's default planner computes for the
patch (see ``_common.nnunet_architecture``). Weights are random: accuracy is irrelevant here.

Rows: the CNN with mirroring TTA (nnU-Net's default, 4 passes per tile in 2D, the baseline), the
CNN without TTA, and each EquiFlex preset (``--presets``) through nnUNetPredictor with no mirroring
axes, as EquiFlexTrainer saves them; with our trainer module imported, as ``nnUNetv2_predict`` runs
it, nnUNetPredictor uses the mirror-symmetric window for them. Targets checked at the end: the
default preset (``--default``, else ``DEFAULT_PRESET``) at least 1.5x faster per case than the CNN
with TTA, the preset with the fewest FLOPs at least 3x.

    python benchmarks/bench_inference.py --quick   # 2 cases, 2 repeats
    python benchmarks/bench_inference.py           # 2 cases (1x256x256, 1x300x280), 3 repeats
    python benchmarks/bench_inference.py --full    # adds 1x512x512 and a 10-slice 10x232x256 volume
    python benchmarks/bench_inference.py --3d      # 3d_fullres: 3D presets vs the 3D CNN with 8-pass TTA, 2 volumes
    python benchmarks/bench_inference.py --3d --quick   # 3D at a 16x64x64 patch, one small volume
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from _common import (
    allow_many_compiles,
    build_cnn,
    measure_interleaved,
    mib,
    nnunet_architecture,
    pick_device,
    print_header,
)
from _common import print_table as table
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

import nnunet_equiflex.nnunet_patch  # noqa: F401  nnU-Net's predictor as our trainer module leaves it
from nnunet_equiflex.flops import network_forward_flops
from nnunet_equiflex.network import (
    DEFAULT_PRESET,
    DEFAULT_PRESET_3D,
    PRESETS,
    PRESETS_3D,
    EquiFlexFormer,
    preset_kwargs,
)
from nnunet_equiflex.planning import token_size_for_spacing

PATCH = (256, 224)
IN_CHANNELS = 1
DATASET_JSON = {
    "channel_names": {"0": "MRI"},
    "labels": {"background": 0, "RV": 1, "MLV": 2, "LVC": 3},
    "numTraining": 100,
    "file_ending": ".nii.gz",
}
NUM_CLASSES = len(DATASET_JSON["labels"])
TIMED_PRESETS = (
    "small_lift4_conv",
    "tiny_conv",
    "small_lift4",
    "tiny_lift4",
    "vit_s8",
    "vit_s8_flip2",
    "vit_s8_flip0",
    "vit_ti8",
    "tiny",
)
# 3d_fullres: thick slices (3 mm) of 1 mm pixels, so the planner's tokens are 4x8x8 for the 8 px presets.
SPACING_3D = (3.0, 1.0, 1.0)
PATCH_3D, QUICK_PATCH_3D = (32, 96, 96), (16, 64, 64)
TIMED_PRESETS_3D = ("vit_s8_3d", "vit_ti8_3d")


def configuration_name(patch: tuple[int, ...]) -> str:
    return "2d" if len(patch) == 2 else "3d_fullres"


def plans_for(architecture: dict, patch: tuple[int, ...]) -> dict:
    """A 2D (spacing 1 x 1 mm, 10 mm slices) or 3d_fullres (``SPACING_3D``) nnU-Net plan as
    ``nnUNetv2_plan_and_preprocess`` writes it; the configuration is named by the patch's axis count."""
    resample = "resample_data_or_seg_to_shape"
    spacing = [1.0, 1.0] if len(patch) == 2 else list(SPACING_3D)
    return {
        "dataset_name": "Dataset999_Bench",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [10.0, 1.0, 1.0] if len(patch) == 2 else spacing,
        "original_median_shape_after_transp": [10, *patch] if len(patch) == 2 else list(patch),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 1.0,
                "mean": 0.0,
                "median": 0.0,
                "min": -1.0,
                "percentile_00_5": -1.0,
                "percentile_99_5": 1.0,
                "std": 1.0,
            }
        },
        "configurations": {
            configuration_name(patch): {
                "data_identifier": f"nnUNetPlans_{configuration_name(patch)}",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 12,
                "patch_size": list(patch),
                "median_image_size_in_voxels": list(patch),
                "spacing": spacing,
                "normalization_schemes": ["ZScoreNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": resample,
                "resampling_fn_seg": resample,
                "resampling_fn_probabilities": resample,
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities_kwargs": {
                    "is_seg": False,
                    "order": 1,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "architecture": architecture,
                "batch_dice": True,
            }
        },
    }


def make_predictor(cls, network, plans: dict, mirroring_axes, trainer_name: str, device: torch.device):
    predictor = cls(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=mirroring_axes is not None,
        perform_everything_on_device=device.type == "cuda",
        device=device,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    plans_manager = PlansManager(copy.deepcopy(plans))
    configuration_manager = plans_manager.get_configuration(next(iter(plans["configurations"])))
    network = network.to(device).eval()
    predictor.manual_initialization(
        network,
        plans_manager,
        configuration_manager,
        [copy.deepcopy(network.state_dict())],  # one "fold", loaded before each case as nnU-Net does
        DATASET_JSON,
        trainer_name,
        mirroring_axes,
    )
    return predictor


def num_tiles(predictor: nnUNetPredictor, shape: tuple[int, ...]) -> int:
    # 2D plans on (z, y, x) cases: nnU-Net pads y, x up to the patch and tiles slice by slice; 3D pads all three
    patch = predictor.configuration_manager.patch_size
    padded = (*shape[: 3 - len(patch)], *(max(s, p) for s, p in zip(shape[-len(patch) :], patch)))
    return len(predictor._internal_get_sliding_window_slicers(padded))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="2 repeats")
    mode.add_argument("--full", action="store_true", help="more cases, 5 repeats")
    parser.add_argument("--3d", dest="three_d", action="store_true", help="3d_fullres: 3D presets vs the 3D CNN")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--num-cases", type=int, help="time only the first N cases (a 3D case takes minutes on CPU)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed calls per row before timing (compiled windows compile there)"
    )
    parser.add_argument(
        "--presets", nargs="+", choices=[*PRESETS, *PRESETS_3D], help=f"EquiFlex rows (default "
        f"{' '.join(TIMED_PRESETS)}, with --3d {' '.join(TIMED_PRESETS_3D)}; --quick: the default preset and tiny)",
    )  # fmt: skip
    parser.add_argument(
        "--default", choices=[*PRESETS, *PRESETS_3D], help="the preset the per-case target is checked for "
        f"(default {DEFAULT_PRESET}, with --3d {DEFAULT_PRESET_3D})",
    )  # fmt: skip
    args = parser.parse_args()
    args.default = args.default or (DEFAULT_PRESET_3D if args.three_d else DEFAULT_PRESET)
    if args.presets is None:
        small, timed = ("tiny3d", TIMED_PRESETS_3D) if args.three_d else ("tiny", TIMED_PRESETS)
        args.presets = list(dict.fromkeys([args.default, small] if args.quick else [args.default, *timed]))
    return args


def network_kwargs_for(preset: str, patch: tuple[int, ...]) -> dict:
    """The preset as the planner writes it for this configuration: in 3D the tokens follow the spacing."""
    kwargs = preset_kwargs(preset)
    if len(patch) == 3:
        kwargs["patch_size"] = token_size_for_spacing(kwargs["patch_size"], SPACING_3D)
    return kwargs


def build_predictors(plans: dict, architecture: dict, presets: list[str], patch, device: torch.device) -> dict:
    """Row name -> (predictor, passes per tile, preset or None)."""
    torch.manual_seed(0)
    cnn = build_cnn(architecture, IN_CHANNELS, NUM_CLASSES, deep_supervision=False)
    axes = tuple(range(len(patch)))
    rows = {
        "CNN + mirroring TTA (nnU-Net default)": (
            make_predictor(nnUNetPredictor, cnn, plans, axes, "nnUNetTrainer", device),
            2 ** len(axes),
            None,
        ),
        "CNN, no TTA (--disable_tta)": (
            make_predictor(nnUNetPredictor, cnn, plans, None, "nnUNetTrainer", device),
            1,
            None,
        ),
    }
    for preset in presets:
        network = EquiFlexFormer(IN_CHANNELS, NUM_CLASSES, **network_kwargs_for(preset, patch))
        predictor = make_predictor(nnUNetPredictor, network, plans, None, "EquiFlexTrainer", device)
        rows[f"EquiFlex {preset}, 1 pass"] = (predictor, 1, preset)
    return rows


def preset_gflops(preset: str, patch: tuple[int, ...]) -> float:
    kwargs = network_kwargs_for(preset, patch)
    network = EquiFlexFormer(IN_CHANNELS, NUM_CLASSES, **kwargs)
    return network_forward_flops(network, patch)["total"] / 1e9


def time_case(rows: dict, shape: tuple[int, ...], spacing, device: torch.device, repeats: int, rng, warmup: int = 1):
    """Prints the table of one case; returns each EquiFlex preset's speed-up against the CNN with TTA."""
    image = rng.standard_normal((IN_CHANNELS, *shape)).astype(np.float32)
    properties = {"spacing": list(spacing)}  # the plan's own spacing: no resampling
    calls = {name: (lambda p=p, i=image: p.predict_single_npy_array(i, properties)) for name, (p, _, _) in rows.items()}
    timings = measure_interleaved(calls, device, repeats, warmup)
    baseline_s = timings[next(iter(timings))].median_s
    table_rows, speedups = [], {}
    for name, (predictor, passes, preset) in rows.items():
        timing = timings[name]
        speedup = baseline_s / timing.median_s
        if preset is not None:
            speedups[preset] = speedup
        table_rows.append(
            [
                name,
                f"{num_tiles(predictor, shape)} x {passes}",
                f"{timing.median_s:.2f}",
                f"{speedup:.2f}x",
                f"{timing.spread:.0%}",
                mib(timing.peak_bytes),
            ]
        )
    print(f"## case {'x'.join(map(str, shape))}")
    table(["predictor", "tiles x passes", "s / case", "speed-up vs CNN+TTA", "spread", "peak mem"], table_rows)
    return speedups


def print_targets(verdicts: list[tuple[tuple, dict]], default: str, presets: list[str], patch) -> None:
    """2D: the default >= 1.5x, the smallest preset >= 3x faster per case; 3D: the default 3D preset >= 2x."""
    smallest = min(presets, key=lambda p: preset_gflops(p, patch))
    targets = [(default, 2.0, "the default 3D preset")] if len(patch) == 3 else [
        (default, 1.5, "the default"), (smallest, 3.0, "the smallest preset")]  # fmt: skip
    for preset, target, what in targets:
        if preset not in presets:
            print(f"Target for {what} ({preset}): not measured (not among --presets)")
            continue
        ratios = [speedups[preset] for _, speedups in verdicts]
        cases = ", ".join(f"{'x'.join(map(str, shape))}: {s[preset]:.2f}x" for shape, s in verdicts)
        verdict = "MET" if min(ratios) >= target else "MISSED"
        print(f"Target '{what} ({preset}) >= {target}x faster per case than the CNN with TTA': {verdict} ({cases})")


def run_setup(args) -> tuple[tuple[int, ...], list[tuple[int, ...]], int]:
    """Patch, cases and repeats: 2D slices (z, y, x with z slices) or 3D volumes."""
    repeats = args.repeats or (2 if args.quick else (5 if args.full else 3))
    if args.three_d:
        patch = QUICK_PATCH_3D if args.quick else PATCH_3D
        cases = [(20, 72, 72)] if args.quick else [(40, 120, 120), (45, 130, 110)]
        return patch, cases, repeats
    cases = [(1, 256, 256), (1, 300, 280)] + ([(1, 512, 512), (10, 232, 256)] if args.full else [])
    return PATCH, cases, repeats


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)
    patch, cases, repeats = run_setup(args)
    cases = cases[: args.num_cases] if args.num_cases else cases
    allow_many_compiles()
    print_header("End-to-end prediction per case through nnU-Net's predictor", device)
    spacing = SPACING_3D if len(patch) == 3 else (1.0, 1.0)
    architecture, fitted = nnunet_architecture(patch, spacing)
    assert fitted == patch, fitted
    plans = plans_for(architecture, patch)
    print(
        f"{configuration_name(patch)} plan: patch {'x'.join(map(str, patch))}, spacing {'x'.join(map(str, spacing))}, "
        f"tile step 0.5, Gaussian weighting; CNN {architecture['arch_kwargs']['n_stages']} stages from nnU-Net's "
        f"planner topology, TTA {2 ** len(patch)} passes. Random weights, {NUM_CLASSES} classes. EquiFlex presets "
        "(GFLOPs per tile, analytic): "
        + ", ".join(f"{p} {preset_gflops(p, patch):.1f}" for p in args.presets)
        + f"; attention backend auto ({'flex' if device.type == 'cuda' else 'window'} on {device.type}, compiled); "
        "nnUNetPredictor runs the mirror-symmetric window for them (nnunet_equiflex.nnunet_patch), one pass per tile."
    )
    print(
        "timed: predict_single_npy_array (preprocess + sliding window + resample + argmax), "
        f"median of {repeats} after {args.warmup} warm-up call(s) per row, rows timed round-robin"
    )
    print()
    rows = build_predictors(plans, architecture, args.presets, patch, device)
    rng = np.random.default_rng(0)
    case_spacing = SPACING_3D if len(patch) == 3 else (10.0, 1.0, 1.0)
    verdicts = [(shape, time_case(rows, shape, case_spacing, device, repeats, rng, args.warmup)) for shape in cases]
    print_targets(verdicts, args.default, args.presets, patch)


if __name__ == "__main__":
    main()
