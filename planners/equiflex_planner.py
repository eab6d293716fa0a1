"""EquiFlexPlanner: nnU-Net plans for EquiFlexFormer.

nnU-Net's ``-pl`` only finds planners inside nnunetv2, so this one runs through
``nnunet-equiflex plan -d DATASET`` (or the Python API). It keeps everything nnU-Net decides
about the data (spacing, normalisation, transpose, resampling), so the planned configuration (``2d``
or ``3d_fullres``) reuses nnU-Net's preprocessed ``nnUNetPlans_2d`` / ``nnUNetPlans_3d_fullres``
folder, and changes what is about the network:

- patch size: nnU-Net's, rounded up to a multiple of the token size per axis; square, of about the
  same area, when the network uses group ``d4`` (see ``square_patch_size``); in 3D the token is
  halved along axes of coarse spacing (``token_size_for_spacing``);
- batch size: from a ViT memory model (tokens, embed dim, depth, lifted copies) for the GPU
  memory target, not from the CNN's; capped like nnU-Net's so a batch covers at most 5% of
  the dataset;
- architecture: ``nnunet_equiflex.network.EquiFlexFormer`` with its JSON kwargs.

The configurations not planned keep nnU-Net's CNN plans (or, in an existing plans file, what was
planned there before).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunet_equiflex.network import DEFAULT_PRESET, DEFAULT_PRESET_3D, preset_kwargs
from nnunet_equiflex.planning import (
    NETWORK_CLASS_NAME,
    batch_size_for_memory,
    describes_equiflex,
    fit_patch_size,
    token_size_for_spacing,
)

DEFAULT_PLANS_NAME = "EquiFlexPlans"
PLANNABLE_CONFIGURATIONS = ("2d", "3d_fullres")


def square_patch_size(patch_size: tuple[int, ...] | list[int], token_size: int) -> tuple[int, int]:
    """A square 2D patch of about the same area, its side a multiple of ``token_size``.

    D4 (90-degree rotations) maps only squares onto themselves. The same area keeps the token
    count, so the cost per sample and the memory-based batch size stay about the same; taking
    the longer side instead would multiply the cost of elongated patches.
    """
    side = max(token_size, round(math.sqrt(patch_size[0] * patch_size[1]) / token_size) * token_size)
    return side, side


class EquiFlexPlanner(ExperimentPlanner):
    def __init__(
        self,
        dataset_name_or_id: str | int,
        gpu_memory_target_in_gb: float = 8,
        preprocessor_name: str = "DefaultPreprocessor",
        plans_name: str = DEFAULT_PLANS_NAME,
        overwrite_target_spacing: list[float] | tuple[float, ...] | None = None,
        suppress_transpose: bool = False,
        preset: str = DEFAULT_PRESET,
        network_overrides: dict[str, Any] | None = None,
        reuse_data_of_plans: str = "nnUNetPlans",
        batch_size: int | None = None,
        configuration: str = "2d",
    ):
        super().__init__(
            dataset_name_or_id,
            gpu_memory_target_in_gb,
            preprocessor_name,
            plans_name,
            overwrite_target_spacing,
            suppress_transpose,
        )
        if configuration not in PLANNABLE_CONFIGURATIONS:
            raise ValueError(
                f"configuration {configuration!r} cannot be planned for EquiFlex; choose one of "
                f"{', '.join(PLANNABLE_CONFIGURATIONS)}"
            )
        self.configuration = configuration
        self.network_kwargs = preset_kwargs(preset, **(network_overrides or {}))
        dims, needed = self.network_kwargs.get("spatial_dims", 2), 3 if configuration == "3d_fullres" else 2
        if dims != needed:
            fix = "a 3D preset (--preset vit_s8_3d; tiny3d for CPU tests)" if needed == 3 else "a 2D preset (e.g. tiny)"
            raise ValueError(
                f"preset {preset!r} builds a {dims}D network, configuration {configuration!r} needs a {needed}D one; "
                f"pass {fix}"
            )
        self.reuse_data_of_plans = reuse_data_of_plans
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.fixed_batch_size = batch_size

    def generate_data_identifier(self, configuration_name: str) -> str:
        # Preprocessing is nnU-Net's default, so its preprocessed data of the planned configuration serve as they
        # are (the 2d one always: plans of a 3D run keep pointing 2d at nnU-Net's 2d data, as a 2d run does).
        if configuration_name in ("2d", self.configuration) and self.reuse_data_of_plans:
            return f"{self.reuse_data_of_plans}_{configuration_name}"
        return super().generate_data_identifier(configuration_name)

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset, _cache):
        plan = super().get_plans_for_configuration(
            spacing, median_shape, data_identifier, approximate_n_voxels_dataset, _cache
        )
        planned = self.configuration == "2d" and len(spacing) == 2
        planned |= self.configuration == "3d_fullres" and data_identifier == self.generate_data_identifier("3d_fullres")
        if not planned:
            return plan
        num_channels = len(self.dataset_json["channel_names"])
        num_classes = len(self.dataset_json["labels"])
        kwargs = dict(self.network_kwargs)
        if len(spacing) == 3:
            kwargs["patch_size"] = token_size_for_spacing(kwargs["patch_size"], [float(s) for s in spacing])
        patch_size = fit_patch_size(plan["patch_size"], kwargs["patch_size"])
        if kwargs.get("group") == "d4":
            patch_size = square_patch_size(patch_size, kwargs["patch_size"])
        max_batch = round(
            approximate_n_voxels_dataset * self.max_dataset_covered / np.prod(patch_size, dtype=np.float64)
        )
        plan["patch_size"] = patch_size
        plan["batch_size"] = self.fixed_batch_size or batch_size_for_memory(
            patch_size,
            num_channels,
            num_classes,
            kwargs,
            self.UNet_vram_target_GB,
            max_batch_size=max(max_batch, self.UNet_min_batch_size),
            min_batch_size=self.UNet_min_batch_size,
        )
        plan["architecture"] = {
            "network_class_name": NETWORK_CLASS_NAME,
            "arch_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
            "_kw_requires_import": [],
        }
        return plan

    def save_plans(self, plans):
        """Writing happens in ``plan_dataset`` (atomically, never over different plans unasked)."""
        self.plans = plans


def plan_dataset(
    dataset: str | int,
    preset: str | None = None,
    gpu_memory_target_in_gb: float = 8,
    plans_name: str = DEFAULT_PLANS_NAME,
    network_overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
    preprocess: bool = False,
    num_processes: int = 4,
    batch_size: int | None = None,
    configuration: str = "2d",
) -> dict:
    """Plan ``configuration`` (``2d`` or ``3d_fullres``) of ``dataset`` for EquiFlex and write
    ``<plans_name>.json`` next to nnU-Net's plans.

    Needs nnU-Net's fingerprint (``nnUNetv2_plan_and_preprocess -d D -c 2d`` or
    ``nnUNetv2_extract_fingerprint -d D``). The other configurations of an existing plans file are kept
    as they are, so 2d and 3d_fullres can be planned one after the other into the same plans. Existing
    plans with different content are only replaced with ``overwrite`` (planning an EquiFlex configuration
    where the file has nnU-Net's CNN one needs no ``overwrite``); the file is written atomically.
    ``batch_size`` replaces the memory model's choice (for example nnU-Net's CNN batch, to compare
    networks at the same batch). ``preset`` defaults to ``DEFAULT_PRESET`` for 2d, ``DEFAULT_PRESET_3D`` for 3d_fullres.
    """
    import json

    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    name, folder = _fingerprinted_dataset(dataset, configuration)
    if preset is None:
        preset = DEFAULT_PRESET_3D if configuration == "3d_fullres" else DEFAULT_PRESET
    planner = EquiFlexPlanner(
        name,
        gpu_memory_target_in_gb,
        plans_name=plans_name,
        preset=preset,
        network_overrides=network_overrides,
        batch_size=batch_size,
        configuration=configuration,
    )
    plans = planner.plan_experiment()
    if configuration not in plans["configurations"]:
        raise FileNotFoundError(
            f"nnU-Net's plans for {name} have no {configuration} configuration (nnU-Net plans 3d_fullres only for "
            f"3D images, more than one slice deep); for 3D images run `nnUNetv2_plan_and_preprocess -d {dataset} "
            f"-c {configuration}` first, for 2D images plan and train '-c 2d'"
        )
    recursive_fix_for_json_export(plans)
    plans = json.loads(json.dumps(plans))
    plans_file = folder / f"{plans_name}.json"
    _keep_other_configurations(plans, plans_file, configuration, overwrite)
    _write_atomically(plans_file, json.dumps(plans, indent=4))
    cfg = plans["configurations"][configuration]
    token = cfg["architecture"]["arch_kwargs"]["patch_size"]
    print(f"EquiFlex plans written to {plans_file}")
    print(
        f"  {configuration}: patch size {cfg['patch_size']}, batch size {cfg['batch_size']}, data "
        f"{cfg['data_identifier']}" + (f", token size {token}" if configuration != "2d" else "")
    )
    _check_preprocessed(
        folder / cfg["data_identifier"], name, dataset, plans_name, configuration, preprocess, num_processes
    )
    return plans


def _fingerprinted_dataset(dataset: str | int, configuration: str):
    """(dataset name, its nnUNet_preprocessed folder), once nnU-Net's fingerprint is there."""
    from pathlib import Path

    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_preprocessed:
        raise FileNotFoundError(
            "nnUNet_preprocessed is not set; export it (and nnUNet_raw, nnUNet_results) to the folders nnU-Net uses"
        )
    name = maybe_convert_to_dataset_name(dataset)
    folder = Path(nnUNet_preprocessed) / name
    if not (folder / "dataset_fingerprint.json").is_file():
        raise FileNotFoundError(
            f"no dataset fingerprint in {folder}; run `nnUNetv2_plan_and_preprocess -d {dataset} -c {configuration}` "
            f"(or `nnUNetv2_extract_fingerprint -d {dataset}`) first"
        )
    return name, folder


def _keep_other_configurations(plans: dict, plans_file, configuration: str, overwrite: bool) -> None:
    """Copy the existing file's other configurations into ``plans``; refuse to replace different content
    without ``overwrite`` (nnU-Net's CNN configuration gives way to ours without it)."""
    import json

    if not plans_file.is_file():
        return
    old = json.loads(plans_file.read_text())
    old_configurations = old.get("configurations", {})
    for cfg, value in old_configurations.items():  # keep what was planned before, and custom configurations
        if cfg != configuration:
            plans["configurations"][cfg] = value
    replaced = old_configurations.get(configuration)
    compared = old
    if replaced is not None and not describes_equiflex(replaced.get("architecture")):
        compared = {
            **old,
            "configurations": {**old_configurations, configuration: plans["configurations"][configuration]},
        }
    if compared != plans and not overwrite:
        raise FileExistsError(
            f"{plans_file} exists with different content; pass --overwrite to replace it (results trained "
            "with the old plans keep their own copy in their results folder)"
        )


def _write_atomically(path, text: str) -> None:
    import os

    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_preprocessed(data_folder, name, dataset, plans_name, configuration, preprocess, num_processes) -> None:
    """Preprocess a missing data folder with ``preprocess``, else say which command does it."""
    if data_folder.is_dir() and any(data_folder.iterdir()):
        return
    if preprocess:
        from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess as nnunet_preprocess

        nnunet_preprocess(
            [int(name[7:10])], plans_name, configurations=(configuration,), num_processes=(num_processes,)
        )
    else:
        print(
            f"  preprocessed data {data_folder} is missing: run `nnUNetv2_preprocess -d {dataset} -plans_name "
            f"{plans_name} -c {configuration}` or add --preprocess"
        )
