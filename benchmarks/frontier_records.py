"""Frontier records: one network's measured Dice, kept as a small JSON file so that the frontier's hours of
CPU training can be spread over several runs and machines.

A record holds what a training produced and nothing that depends on the machine's speed: the run's settings
(data, budget), a digest of the dataset's voxels, ``compare``'s rows for that network on the test slices,
and the epoch time from nnU-Net's log as context. Timing is never taken from a record: the frontier times
every row together, round-robin on one machine, with an untrained copy of a recorded network (its weights do
not change its cost).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

RECORD_VERSION = 1


class RecordError(SystemExit):
    """A record that does not belong to this run; the message says what differs and what to do."""


def data_digest(raw: Path) -> str:
    """sha256 over every image and label of a raw nnU-Net dataset: file names, sizes, spacing and voxel values."""
    import SimpleITK as sitk

    digest = hashlib.sha256()
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        for path in sorted((raw / sub).glob("*.nii.gz")):
            image = sitk.ReadImage(str(path))
            array = np.ascontiguousarray(sitk.GetArrayFromImage(image))
            digest.update(f"{sub}/{path.name} {array.shape} {array.dtype} {image.GetSpacing()}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def record_path(folder: Path, trainer: str) -> Path:
    return folder / f"{trainer}.json"


def make_record(settings: dict, digest: str, trainer: str, spec: str, rows: list[dict], epoch_s: float) -> dict:
    import platform

    import torch

    return {
        "version": RECORD_VERSION,
        "trainer": trainer,
        "spec": spec,
        "settings": settings,
        "data_digest": digest,
        "compare_rows": rows,
        "train_s_per_epoch_log": epoch_s,
        "trained_with": f"torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} cores",
    }


def write_record(folder: Path, record: dict) -> Path:
    """Write atomically; an existing record of the same network is never replaced (delete it to retrain)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = record_path(folder, record["trainer"])
    if path.is_file():
        if json.loads(path.read_text()) == json.loads(json.dumps(record)):
            return path
        raise RecordError(f"{path} already holds another record of {record['trainer']}; delete it to record anew")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def load_records(folder: Path, settings: dict, digest: str) -> dict[str, dict]:
    """Every record in ``folder``, by trainer; each must come from the same settings and the same data."""
    records = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = json.loads(path.read_text())
        if record.get("version") != RECORD_VERSION:
            raise RecordError(f"{path}: record version {record.get('version')}, this script reads {RECORD_VERSION}")
        if record["settings"] != json.loads(json.dumps(settings)):
            changed = sorted(k for k in set(settings) | set(record["settings"]) if record["settings"].get(k) !=
                             json.loads(json.dumps(settings)).get(k))  # fmt: skip
            raise RecordError(f"{path} was trained with other settings ({', '.join(changed)}); use the same "
                              "--epochs/--iterations (and --quick or not), or another --records folder")  # fmt: skip
        if record["data_digest"] != digest:
            raise RecordError(f"{path} was trained on other data (dataset digest differs); retrain it here or use "
                              "another --records folder")  # fmt: skip
        records[record["trainer"]] = record
    return records


UNTRAINED_SCRIPT = """
import sys, torch
from nnunetv2.run.run_training import get_trainer_from_args
trainer = get_trainer_from_args(sys.argv[1], "2d", 0, sys.argv[2], sys.argv[3], device=torch.device("cpu"))
trainer.initialize()
trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets the inference mirror axes, as training does
trainer.save_checkpoint(trainer.output_folder + "/checkpoint_final.pth")
"""


def untrained_model_dir(dataset: str, trainer: str, plans: str, env: dict, results: Path) -> Path:
    """An nnU-Net model folder (fold 0) of ``trainer`` with its initial weights, under ``results``: what the
    frontier times for a network whose Dice comes from a record."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    name = maybe_convert_to_dataset_name(dataset)
    model_dir = results / name / f"{trainer}__{plans}__2d"
    if not (model_dir / "fold_0" / "checkpoint_final.pth").is_file():
        child_env = {**env, "nnUNet_results": str(results)}
        done = subprocess.run([sys.executable, "-c", UNTRAINED_SCRIPT, dataset, trainer, plans], env=child_env,
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            raise RecordError(f"could not build an untrained {trainer} for timing:\n{done.stderr[-2000:]}")
        preprocessed = Path(env["nnUNet_preprocessed"]) / name
        for source, target in ((f"{plans}.json", "plans.json"), ("dataset.json", "dataset.json")):
            (model_dir / target).write_text((preprocessed / source).read_text())
    return model_dir
