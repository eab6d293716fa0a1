"""EquiFlexPlanner: nnU-Net plans for EquiFlexFormer.

nnU-Net's ``-pl`` only finds planners inside nnunetv2, so this one runs through
``nnunet-equiflex plan -d DATASET`` (or the Python API). It keeps everything nnU-Net decides
about the data (spacing, normalisation, transpose, resampling), so the 2d configuration reuses
nnU-Net's preprocessed ``nnUNetPlans_2d`` folder, and changes what is about the network:

- patch size: nnU-Net's, rounded up to a multiple of the token size; square, of about the
  same area, when the network uses group ``d4`` (see ``square_patch_size``);
- batch size: from a ViT memory model (tokens, embed dim, depth, lifted copies) for the GPU
  memory target, not from the CNN's; capped like nnU-Net's so a batch covers at most 5% of
  the dataset;
- architecture: ``nnunet_equiflex.network.EquiFlexFormer`` with its JSON kwargs.

3D configurations keep nnU-Net's CNN plans untouched (EquiFlex trainers are 2D only).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunet_equiflex.network import DEFAULT_PRESET, preset_kwargs
from nnunet_equiflex.planning import NETWORK_CLASS_NAME, batch_size_for_memory, fit_patch_size

DEFAULT_PLANS_NAME = "EquiFlexPlans"


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
    ):
        super().__init__(
            dataset_name_or_id,
            gpu_memory_target_in_gb,
            preprocessor_name,
            plans_name,
            overwrite_target_spacing,
            suppress_transpose,
        )
        self.network_kwargs = preset_kwargs(preset, **(network_overrides or {}))
        self.reuse_data_of_plans = reuse_data_of_plans
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.fixed_batch_size = batch_size

    def generate_data_identifier(self, configuration_name: str) -> str:
        # Preprocessing is nnU-Net's default, so its preprocessed 2d data serve as they are.
        if configuration_name == "2d" and self.reuse_data_of_plans:
            return f"{self.reuse_data_of_plans}_2d"
        return super().generate_data_identifier(configuration_name)

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset, _cache):
        plan = super().get_plans_for_configuration(
            spacing, median_shape, data_identifier, approximate_n_voxels_dataset, _cache
        )
        if len(spacing) != 2:
            return plan
        num_channels = len(self.dataset_json["channel_names"])
        num_classes = len(self.dataset_json["labels"])
        patch_size = fit_patch_size(plan["patch_size"], self.network_kwargs["patch_size"])
        if self.network_kwargs.get("group") == "d4":
            patch_size = square_patch_size(patch_size, self.network_kwargs["patch_size"])
        max_batch = round(
            approximate_n_voxels_dataset * self.max_dataset_covered / np.prod(patch_size, dtype=np.float64)
        )
        plan["patch_size"] = patch_size
        plan["batch_size"] = self.fixed_batch_size or batch_size_for_memory(
            patch_size,
            num_channels,
            num_classes,
            self.network_kwargs,
            self.UNet_vram_target_GB,
            max_batch_size=max(max_batch, self.UNet_min_batch_size),
            min_batch_size=self.UNet_min_batch_size,
        )
        plan["architecture"] = {
            "network_class_name": NETWORK_CLASS_NAME,
            "arch_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in self.network_kwargs.items()},
            "_kw_requires_import": [],
        }
        return plan

    def save_plans(self, plans):
        """Writing happens in ``plan_dataset`` (atomically, never over different plans unasked)."""
        self.plans = plans


def plan_dataset(
    dataset: str | int,
    preset: str = DEFAULT_PRESET,
    gpu_memory_target_in_gb: float = 8,
    plans_name: str = DEFAULT_PLANS_NAME,
    network_overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
    preprocess: bool = False,
    num_processes: int = 4,
    batch_size: int | None = None,
) -> dict:
    """Plan ``dataset`` for EquiFlex and write ``<plans_name>.json`` next to nnU-Net's plans.

    Needs nnU-Net's fingerprint (``nnUNetv2_plan_and_preprocess -d D -c 2d`` or
    ``nnUNetv2_extract_fingerprint -d D``). Existing plans with different content are only
    replaced with ``overwrite``; the file is written atomically. ``batch_size`` replaces the memory
    model's choice (for example nnU-Net's CNN batch, to compare networks at the same batch).
    """
    import json
    import os
    from pathlib import Path

    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    if not nnUNet_preprocessed:
        raise FileNotFoundError(
            "nnUNet_preprocessed is not set; export it (and nnUNet_raw, nnUNet_results) to the folders nnU-Net uses"
        )
    name = maybe_convert_to_dataset_name(dataset)
    folder = Path(nnUNet_preprocessed) / name
    if not (folder / "dataset_fingerprint.json").is_file():
        raise FileNotFoundError(
            f"no dataset fingerprint in {folder}; run `nnUNetv2_plan_and_preprocess -d {dataset} -c 2d` "
            f"(or `nnUNetv2_extract_fingerprint -d {dataset}`) first"
        )
    planner = EquiFlexPlanner(
        name,
        gpu_memory_target_in_gb,
        plans_name=plans_name,
        preset=preset,
        network_overrides=network_overrides,
        batch_size=batch_size,
    )
    plans = planner.plan_experiment()
    recursive_fix_for_json_export(plans)
    plans = json.loads(json.dumps(plans))
    plans_file = folder / f"{plans_name}.json"
    if plans_file.is_file():
        old = json.loads(plans_file.read_text())
        for cfg, value in old.get("configurations", {}).items():  # keep custom configurations, as nnU-Net does
            plans["configurations"].setdefault(cfg, value)
        if old != plans and not overwrite:
            raise FileExistsError(
                f"{plans_file} exists with different content; pass --overwrite to replace it (results trained "
                "with the old plans keep their own copy in their results folder)"
            )
    tmp = plans_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(plans, indent=4))
    os.replace(tmp, plans_file)
    cfg = plans["configurations"]["2d"]
    print(f"EquiFlex plans written to {plans_file}")
    print(f"  2d: patch size {cfg['patch_size']}, batch size {cfg['batch_size']}, data {cfg['data_identifier']}")

    data_folder = folder / cfg["data_identifier"]
    if not data_folder.is_dir() or not any(data_folder.iterdir()):
        if preprocess:
            from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess as nnunet_preprocess

            nnunet_preprocess([int(name[7:10])], plans_name, configurations=("2d",), num_processes=(num_processes,))
        else:
            print(
                f"  preprocessed data {data_folder} is missing: run `nnUNetv2_preprocess -d {dataset} -plans_name "
                f"{plans_name} -c 2d` or add --preprocess"
            )
    return plans
