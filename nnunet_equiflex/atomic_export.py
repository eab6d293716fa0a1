"""Outputs of ``nnunet-equiflex predict`` that are never half-written.

nnU-Net writes each case (segmentation, and with ``--save_probabilities`` the ``.npz`` and ``.pkl``) straight
onto its final names, in export worker processes, and ``--continue_prediction`` skips every case whose files
exist, so a file cut off by a kill would be kept as a prediction. ``export_prediction_atomically`` runs
nnU-Net's own ``export_prediction_from_logits`` with a partial (hidden) output name, then renames the files:
probabilities first, the segmentation last, so an existing segmentation means the whole case is complete.
``install_atomic_exports`` points nnU-Net's predictor module at it, in the process of ``nnunet-equiflex
predict`` only; the export workers receive the function by reference and import it from here.
"""

from __future__ import annotations

import types
import warnings
from pathlib import Path

from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.export_prediction import export_prediction_from_logits

from nnunet_equiflex.atomic import fsync_dir, partial_path, publish
from nnunet_equiflex.fault_injection import maybe_pause_export

__all__ = ["export_prediction_atomically", "install_atomic_exports", "publish_case"]


def _partial_files(partial_truncated: Path) -> list[tuple[Path, str]]:
    """The files a writer made from ``partial_truncated`` (it appends extensions), with their extensions."""
    prefix = partial_truncated.name
    found = []
    for entry in partial_truncated.parent.iterdir():
        rest = entry.name[len(prefix) :]
        if entry.name.startswith(prefix) and (rest == "" or rest.startswith(".")):
            found.append((entry, rest))
    return found


def publish_case(partial_truncated: Path, final_truncated: Path, segmentation_ending: str) -> None:
    """Rename a case's files from their partial names to their final ones, the segmentation last."""
    files = sorted(_partial_files(partial_truncated), key=lambda item: item[1] == segmentation_ending)
    if not files or files[-1][1] != segmentation_ending:
        raise FileNotFoundError(f"the export of {final_truncated.name} wrote no {segmentation_ending} file")
    for entry, ending in files[:-1]:
        publish(entry, f"{final_truncated}{ending}", sync_dir=False)
    fsync_dir(final_truncated.parent)
    publish(files[-1][0], f"{final_truncated}{segmentation_ending}")


def export_prediction_atomically(
    predicted_array_or_file,
    properties_dict: dict,
    configuration_manager,
    plans_manager,
    dataset_json_dict_or_file: dict | str,
    output_file_truncated: str,
    save_probabilities: bool = False,
    num_threads_torch: int = default_num_processes,
) -> None:
    """``export_prediction_from_logits`` with its signature; the case's files appear complete or not at all."""
    if isinstance(dataset_json_dict_or_file, str):
        dataset_json_dict_or_file = load_json(dataset_json_dict_or_file)
    final = Path(output_file_truncated)
    partial = partial_path(final)
    try:
        export_prediction_from_logits(
            predicted_array_or_file,
            properties_dict,
            configuration_manager,
            plans_manager,
            dataset_json_dict_or_file,
            str(partial),
            save_probabilities,
            num_threads_torch,
        )
        maybe_pause_export(final.name)
        publish_case(partial, final, dataset_json_dict_or_file["file_ending"])
    except BaseException:
        for entry, _ in _partial_files(partial):
            entry.unlink(missing_ok=True)
        raise


def install_atomic_exports(predict_module: types.ModuleType) -> bool:
    """Make ``predict_module`` (nnU-Net's ``predict_from_raw_data``) export through
    ``export_prediction_atomically``. Only this process is changed; returns False (with a warning) when the
    module has no such hook, as in an nnunetv2 release that exports differently."""
    if getattr(predict_module, "export_prediction_from_logits", None) is not export_prediction_from_logits:
        warnings.warn(
            f"{predict_module.__name__} has no export_prediction_from_logits to wrap in this nnunetv2 release; "
            "outputs are written directly, so after a kill delete the newest output files before "
            "--continue_prediction.",
            stacklevel=2,
        )
        return False
    predict_module.export_prediction_from_logits = export_prediction_atomically
    return True
