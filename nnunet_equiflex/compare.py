"""Compare trained nnU-Net results (EquiFlex and nnU-Net's CNN) on the same test images.

For every result spec ``TRAINER__PLANS__CONFIGURATION`` and every fold, the test images are predicted with
nnU-Net's own ``nnUNetPredictor``. A network whose checkpoint allows test-time mirroring (nnU-Net's CNN) is run
twice, with its mirroring TTA (2^k passes per tile) and without (1 pass); a network whose checkpoint disables it
(EquiFlex: exactly mirror-equivariant) is run once. Dice comes from nnU-Net's evaluation code
(``compute_metrics_on_folder``); the table also reports seconds per case, parameters, FLOPs per tile and a
flip-consistency score: the fraction of voxels where pred(flip(x)) == flip(pred(x)), over the test cases and
every flip of their mirror axes (3 for a 2D slice, all 7 non-identity flips for a volume).

Flip consistency is measured through nnU-Net's whole pipeline (resampling, padding, sliding window, export).
nnU-Net's own sliding window is not mirror-symmetric (it pads odd size differences asymmetrically, rounds tile
starts, centres its Gaussian off by half a pixel and sums tiles in float16), so no network is 100% consistent
through it on every image size. For our networks nnU-Net's predictor runs the mirror-symmetric window instead
(``nnunet_equiflex/nnunet_patch.py``, installed with our trainers), so the EquiFlex row is the figure users get
from ``nnUNetv2_predict``. Where that patch is off (``EQUIFLEX_SYMMETRIC_PREDICTOR=0``, an
untested nnunetv2), the row says "nnU-Net's window". The numbers are measured, not assumed.

    nnunet-equiflex compare -d 900 -r EquiFlexTrainerTiny_smoke__EquiFlexPlans__2d \\
        nnUNetTrainer_equiflexSmoke__nnUNetPlans__2d \\
        --test-images $nnUNet_raw/Dataset900_SyntheticCardiac/imagesTs \\
        --test-labels $nnUNet_raw/Dataset900_SyntheticCardiac/labelsTs -o compare_out
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

CHECKPOINT = "checkpoint_final.pth"
OUTPUT_FILES = ("results.md", "results.csv", "results.json", "dice.png", "overlays.png")
OUTPUT_DIRS = ("predictions", "flipped_inputs")


class CompareError(Exception):
    """A problem with the inputs of the comparison, explained for the user."""


@dataclass(frozen=True)
class ResultSpec:
    trainer: str
    plans: str
    configuration: str

    @classmethod
    def parse(cls, text: str) -> ResultSpec:
        parts = text.split("__")
        if len(parts) != 3 or not all(parts):
            raise CompareError(
                f"result spec {text!r} is not TRAINER__PLANS__CONFIGURATION "
                "(e.g. EquiFlexTrainerTiny_smoke__EquiFlexPlans__2d)"
            )
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.trainer}__{self.plans}__{self.configuration}"

    @property
    def family(self) -> str:
        if self.trainer.startswith("nnUNetTrainer"):
            return "nnU-Net CNN"
        if self.trainer.startswith("EquiFlex"):
            return "EquiFlex"
        if self.trainer.startswith("Flex"):
            return "Flex ViT (no lifting)"
        return self.trainer


@dataclass
class MethodResult:
    """One table row: a result spec run with or without test-time mirroring."""

    method: str
    spec: str
    use_mirroring: bool
    passes: int
    folds: list[int]
    dice_per_class: dict[str, float] = field(default_factory=dict)  # mean over folds
    dice_mean: float = float("nan")  # mean over folds of the foreground mean
    dice_std: float = float("nan")  # std over folds of the foreground mean
    dice_per_fold: list[float] = field(default_factory=list)
    dice_per_case: dict[str, float] = field(default_factory=dict)  # "fold_F/CASE": mean over foreground classes
    seconds_per_case: float = float("nan")
    params: int = 0
    gflops_per_pass: float = float("nan")
    gflops_per_tile: float = float("nan")  # x passes
    flip_consistency: float = float("nan")
    flip_consistent_cases: str = ""  # "k/n" (case-flip pairs that are exactly consistent)
    prediction_dirs: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# inputs


def _nnunet_paths() -> tuple[Path, Path]:
    raw, results = os.environ.get("nnUNet_raw"), os.environ.get("nnUNet_results")
    if not results:
        raise CompareError("nnUNet_results is not set; export it (and nnUNet_raw, nnUNet_preprocessed) first")
    return Path(raw) if raw else None, Path(results)


def resolve_dataset(dataset: str | int) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(dataset)
    except RuntimeError as error:
        raise CompareError(
            f"dataset {dataset!r} not found in nnUNet_raw, nnUNet_preprocessed or nnUNet_results "
            f"(nnUNet_results={os.environ.get('nnUNet_results')}): {error}"
        ) from None


def model_dir_for(dataset_name: str, spec: ResultSpec) -> Path:
    _, results = _nnunet_paths()
    folder = results / dataset_name / str(spec)
    if not folder.is_dir():
        dataset_id = dataset_name[len("Dataset") : len("Dataset") + 3] if dataset_name.startswith("Dataset") else "D"
        raise CompareError(
            f"no results for {spec}: expected the folder {folder}; create it with "
            f"`nnUNetv2_train {int(dataset_id) if dataset_id.isdigit() else dataset_id} {spec.configuration} FOLD "
            f"-tr {spec.trainer} -p {spec.plans}`"
        )
    return folder


def available_folds(model_dir: Path) -> list[int]:
    folds = []
    for sub in model_dir.glob("fold_*"):
        suffix = sub.name[len("fold_") :]
        if suffix.isdigit() and (sub / CHECKPOINT).is_file():
            folds.append(int(suffix))
    return sorted(folds)


def select_folds(model_dirs: dict[ResultSpec, Path], folds: list[int] | None) -> list[int]:
    """The requested folds (each must exist for every spec), or the folds all specs have."""
    per_spec = {spec: available_folds(d) for spec, d in model_dirs.items()}
    if folds is None:
        common = sorted(set.intersection(*(set(f) for f in per_spec.values())))
        if not common:
            listing = "; ".join(f"{s}: {v or 'none'}" for s, v in per_spec.items())
            raise CompareError(f"no fold with {CHECKPOINT} is shared by all results ({listing})")
        return common
    for spec, have in per_spec.items():
        missing = [f for f in folds if f not in have]
        if missing:
            raise CompareError(
                f"fold(s) {missing} missing for {spec} (no {model_dirs[spec]}/fold_N/{CHECKPOINT}); "
                f"available folds: {have or 'none'}"
            )
    return list(folds)


def raw_cases(folder: Path, file_ending: str, num_channels: int) -> dict[str, list[Path]]:
    """Case id -> channel files of an nnU-Net raw images folder; a clear error if it is not one."""
    if not folder.is_dir():
        raise CompareError(f"test images folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.name.endswith(f"_0000{file_ending}"))
    if not files:
        raise CompareError(
            f"{folder} is not in nnU-Net raw format: no files named CASE_0000{file_ending} "
            f"(channel suffix _XXXX, file ending from dataset.json)"
        )
    cases = {}
    for first in files:
        case = first.name[: -len(f"_0000{file_ending}")]
        channels = [folder / f"{case}_{c:04d}{file_ending}" for c in range(num_channels)]
        missing = [p.name for p in channels if not p.is_file()]
        if missing:
            raise CompareError(f"case {case} in {folder} lacks channel file(s) {missing}")
        cases[case] = channels
    return cases


def check_labels(labels: Path, cases: list[str], file_ending: str) -> None:
    if not labels.is_dir():
        raise CompareError(f"ground-truth labels folder {labels} does not exist")
    missing = [c for c in cases if not (labels / f"{c}{file_ending}").is_file()]
    if missing:
        raise CompareError(f"{labels} has no ground truth for {len(missing)} case(s), e.g. {missing[0]}{file_ending}")


# ---------------------------------------------------------------------------------------------------------------
# measurements


def count_flops(network, num_channels: int, patch_size: tuple[int, ...]) -> float:
    """FLOPs of one forward pass of ``network`` on one patch.

    EquiFlex: analytic (``nnunet_equiflex.flops``, local attention over the window's pairs), because torch's
    FlopCounterMode sees neither FlexAttention, the window backend nor SDPA on CPU; other networks (nnU-Net's
    CNN): FlopCounterMode, which counts their convolutions.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nnunet_equiflex.flops import network_forward_flops

    if hasattr(network, "arch_kwargs"):
        try:
            return float(network_forward_flops(network, patch_size)["total"])
        except ValueError:  # GMR patch embedding: counted below, attention missing (a lower bound)
            pass
    x = torch.zeros(1, num_channels, *patch_size, device=next(network.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(x)
    return float(counter.get_total_flops())


def flip_sets(axes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every non-identity flip of the mirror axes, as the array axes it reverses: 3 in 2D, 7 in 3D."""
    return [c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]


def _flip_name(case: str, flip: tuple[int, ...]) -> str:
    return f"{case}__flip{''.join(map(str, flip))}"


def write_flipped_inputs(
    cases: dict[str, list[Path]], folder: Path, axes: tuple[int, ...], ending: str
) -> dict[str, list[Path]]:
    """Mirrored copies of every case under every flip of the mirror axes (``flip_sets``), same geometry."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    flipped = {}
    for case, channels in cases.items():
        for flip in flip_sets(axes):
            name = _flip_name(case, flip)
            paths = []
            for c, path in enumerate(channels):
                image = sitk.ReadImage(str(path))
                array = np.flip(sitk.GetArrayFromImage(image), axis=flip).copy()
                out = sitk.GetImageFromArray(array)
                out.CopyInformation(image)
                target = folder / f"{name}_{c:04d}{ending}"
                sitk.WriteImage(out, str(target))
                paths.append(target)
            flipped[name] = paths
    return flipped


def flip_consistency(pred_dir: Path, flip_dir: Path, cases: list[str], axes: tuple[int, ...], ending: str):
    """Mean fraction of voxels with pred(flip(x)) == flip(pred(x)), and how many pairs are exact."""
    import SimpleITK as sitk

    fractions = []
    for case in cases:
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / f"{case}{ending}")))
        for flip in flip_sets(axes):
            pred_flipped = sitk.GetArrayFromImage(sitk.ReadImage(str(flip_dir / f"{_flip_name(case, flip)}{ending}")))
            fractions.append(float(np.mean(pred_flipped == np.flip(pred, axis=flip))))
    return float(np.mean(fractions)), sum(f == 1.0 for f in fractions), len(fractions)


def in_plane_axes(example: Path) -> tuple[int, ...]:
    """Array axes to mirror: the in-plane axes of a 2D slice stored as (1, H, W), else all spatial axes."""
    import SimpleITK as sitk

    shape = sitk.GetArrayFromImage(sitk.ReadImage(str(example))).shape
    return tuple(i for i, s in enumerate(shape) if not (len(shape) == 3 and i == 0 and s == 1))


class _Quiet(contextlib.redirect_stdout):
    """nnU-Net's sequential predictor prints a line per case; keep the console for our progress lines."""

    def __init__(self) -> None:
        super().__init__(io.StringIO())


def _predict(predictor, cases: dict[str, list[Path]], out_dir: Path) -> float:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(cases)
    start = time.perf_counter()
    with _Quiet():
        predictor.predict_from_files_sequential(
            [[str(p) for p in cases[c]] for c in names], [str(out_dir / c) for c in names], False, True, None
        )
    return time.perf_counter() - start


def _dice(labels_dir: Path, pred_dir: Path, dataset_json: dict, label_manager, reader_writer) -> dict:
    """nnU-Net's evaluation, called as its trainer does after validation (the plans' reader/writer)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder

    ending = dataset_json["file_ending"]
    rw = reader_writer
    regions = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    return compute_metrics_on_folder(
        str(labels_dir),
        str(pred_dir),
        str(pred_dir / "summary.json"),
        rw,
        ending,
        regions,
        label_manager.ignore_label,
        num_processes=1,
    )


def _class_names(dataset_json: dict, label_manager) -> dict[str, str]:
    by_value = {}
    for name, value in dataset_json["labels"].items():
        by_value[str(tuple(value) if isinstance(value, list) else value)] = name
    regions = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    return {str(r): by_value.get(str(tuple(r) if isinstance(r, list) else r), str(r)) for r in regions}


# ---------------------------------------------------------------------------------------------------------------
# the comparison


def _prepare_output(out_dir: Path, overwrite: bool) -> None:
    existing = [out_dir / n for n in (*OUTPUT_FILES, *OUTPUT_DIRS) if (out_dir / n).exists()]
    if existing and not overwrite:
        raise CompareError(
            f"{out_dir} already holds comparison output ({', '.join(p.name for p in existing)}); "
            "pass --overwrite to replace it or choose another output folder"
        )
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


TestSets = dict[int, tuple[dict[str, list[Path]], Path]]  # fold -> (case -> channel files, labels folder)


@dataclass
class _Tally:
    """What the runs of every spec and fold add up to, keyed by table row."""

    rows: dict[str, MethodResult] = field(default_factory=dict)
    metrics: dict[str, list[dict]] = field(default_factory=dict)  # nnU-Net's evaluation, per fold
    flip_scores: dict[str, list[tuple[float, int, int]]] = field(default_factory=dict)
    class_names: dict[str, str] = field(default_factory=dict)


@dataclass
class _Setting:
    """The inputs every run shares."""

    specs: list[ResultSpec]
    model_dirs: dict[ResultSpec, Path]
    folds: list[int]
    dataset_json: dict
    test_sets: TestSets
    flipped_sets: dict[int, dict[str, list[Path]]]
    axes: tuple[int, ...]
    out_dir: Path
    device: str
    tile_step_size: float
    log: Callable[[str], None]

    @property
    def ending(self) -> str:
        return self.dataset_json["file_ending"]

    @property
    def num_channels(self) -> int:
        return _num_channels(self.dataset_json)


def _num_channels(dataset_json: dict) -> int:
    return len(dataset_json.get("channel_names", dataset_json.get("modality", {"0": ""})))


def _parse_specs(specs: list[str | ResultSpec], test_images, test_labels) -> list[ResultSpec]:
    specs = [s if isinstance(s, ResultSpec) else ResultSpec.parse(s) for s in specs]
    if not specs:
        raise CompareError("give at least one result spec TRAINER__PLANS__CONFIGURATION")
    if (test_images is None) != (test_labels is None):
        raise CompareError("give both --test-images and --test-labels, or neither (cross-validation cases)")
    return specs


def _let_nnunet_find_our_trainers() -> None:
    from nnunet_equiflex.discovery import trainers_dir

    ours = str(trainers_dir())
    ext = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if ours not in ext:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join([*ext, ours])


def _test_sets(dataset_name: str, folds: list[int], dataset_json: dict, test_images, test_labels, log) -> TestSets:
    ending, num_channels = dataset_json["file_ending"], _num_channels(dataset_json)
    if test_images is not None:
        cases = raw_cases(Path(test_images), ending, num_channels)
        check_labels(Path(test_labels), list(cases), ending)
        log(f"test set: {len(cases)} cases from {test_images}")
        return {f: (cases, Path(test_labels)) for f in folds}
    raw, _ = _nnunet_paths()
    if raw is None:
        raise CompareError("no test folder given and nnUNet_raw is not set: cannot find the validation cases")
    raw_dir = raw / dataset_name
    split_file = Path(os.environ.get("nnUNet_preprocessed", "")) / dataset_name / "splits_final.json"
    if not split_file.is_file():
        raise CompareError(f"no test folder given and no {split_file} for the cross-validation cases")
    splits = json.loads(split_file.read_text())
    all_cases = raw_cases(raw_dir / "imagesTr", ending, num_channels)
    test_sets = {}
    for f in folds:
        if f >= len(splits):
            raise CompareError(f"fold {f} is not in {split_file} ({len(splits)} folds)")
        val = {c: all_cases[c] for c in splits[f]["val"] if c in all_cases}
        test_sets[f] = (val, raw_dir / "labelsTr")
    log(f"no test folder: each fold predicts its validation cases from {raw_dir / 'imagesTr'}")
    return test_sets


def _flipped_sets(test_sets: TestSets, out_dir: Path, axes: tuple[int, ...], ending: str, log):
    """Mirrored copies of each fold's cases; folds that share a test set share its copies."""
    done: dict[int, dict] = {}
    flipped_sets = {}
    for f, (cases, _) in test_sets.items():
        key = id(cases)
        if key not in done:
            done[key] = write_flipped_inputs(cases, out_dir / "flipped_inputs" / f"fold_{f}", axes, ending)
        flipped_sets[f] = done[key]
    log(f"flip check: mirrored copies along array axes {axes} written to {out_dir / 'flipped_inputs'}")
    return flipped_sets


def _load_predictor(setting: _Setting, spec: ResultSpec, fold: int):
    """nnU-Net's own predictor; for our networks it runs the mirror-symmetric window (``nnunet_patch``)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    import nnunet_equiflex.nnunet_patch  # noqa: F401  also installed when nnU-Net imports our trainers

    with _Quiet():  # the predictor prints a note about perform_everything_on_device on CPU
        predictor = nnUNetPredictor(
            tile_step_size=setting.tile_step_size,
            use_gaussian=True,
            use_mirroring=True,
            perform_everything_on_device=setting.device != "cpu",
            device=torch.device(setting.device),
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        predictor.initialize_from_trained_model_folder(str(setting.model_dirs[spec]), use_folds=(fold,))
    return predictor


def _method_label(setting: _Setting, spec: ResultSpec, use_mirroring: bool, passes: int, nnunet_window: bool) -> str:
    label = f"{spec.family} + TTA ({passes} passes)" if use_mirroring else f"{spec.family} (1 pass)"
    if nnunet_window:  # one of our networks, but the patch is switched off or not installed
        label = label[:-1] + ", nnU-Net's window)"
    if len(setting.specs) > len({s.family for s in setting.specs}):
        label += f" [{spec.trainer}]"
    return label


def _evaluate_fold(setting: _Setting, tally: _Tally, spec: ResultSpec, fold: int, flip_check: bool) -> None:
    """Predict one fold's test set with one result spec, with and (if it allows TTA) without mirroring."""
    import torch

    from nnunet_equiflex.nnunet_patch import is_equiflex_network, uses_symmetric_window

    predictor = _load_predictor(setting, spec, fold)
    network = predictor.network.eval()
    patch = tuple(predictor.configuration_manager.patch_size)
    axes_ckpt = tuple(predictor.allowed_mirroring_axes or ())
    modes = [(True, 2 ** len(axes_ckpt)), (False, 1)] if axes_ckpt else [(False, 1)]
    tally.class_names = tally.class_names or _class_names(predictor.dataset_json, predictor.label_manager)
    params = sum(p.numel() for p in network.parameters())
    flops = count_flops(network, setting.num_channels, patch)
    with torch.no_grad():  # warm-up (FlexAttention compiles on its first call): not part of s/case
        network(torch.zeros(1, setting.num_channels, *patch, device=predictor.device))
    nnunet_window = is_equiflex_network(network) and not uses_symmetric_window(predictor)
    for use_mirroring, passes in modes:
        label = _method_label(setting, spec, use_mirroring, passes, nnunet_window)
        row = tally.rows.setdefault(
            label, MethodResult(label, str(spec), use_mirroring, passes, setting.folds, params=params)
        )
        row.gflops_per_pass = flops / 1e9
        row.gflops_per_tile = flops * passes / 1e9
        predictor.use_mirroring = use_mirroring
        _run_mode(setting, tally, predictor, row, fold, flip_check)


def _run_mode(setting: _Setting, tally: _Tally, predictor, row: MethodResult, fold: int, flip_check: bool) -> None:
    """Predict, evaluate and (with ``flip_check``) predict the flipped copies; add the fold to ``row``."""
    label, spec, use_mirroring = row.method, row.spec, predictor.use_mirroring
    cases, labels_dir = setting.test_sets[fold]
    pred_dir = setting.out_dir / "predictions" / f"{spec}__{'tta' if use_mirroring else 'notta'}" / f"fold_{fold}"
    setting.log(f"[{label}] fold {fold}: predicting {len(cases)} cases (mirroring {use_mirroring}) ...")
    seconds = _predict(predictor, cases, pred_dir)
    metrics = _dice(
        labels_dir, pred_dir, setting.dataset_json, predictor.label_manager,
        predictor.plans_manager.image_reader_writer_class(),
    )  # fmt: skip
    previous = 0.0 if np.isnan(row.seconds_per_case) else row.seconds_per_case  # summed over folds
    row.seconds_per_case = previous + seconds / len(cases)
    row.prediction_dirs.append(str(pred_dir))
    tally.metrics.setdefault(label, []).append(metrics)
    setting.log(
        f"[{label}] fold {fold}: mean Dice {metrics['foreground_mean']['Dice']:.4f}, {seconds / len(cases):.3f} s/case"
    )
    if not flip_check:
        return
    flipped = setting.flipped_sets[fold]
    flip_dir = pred_dir.parent / f"fold_{fold}_flipped"
    flip_seconds = _predict(predictor, flipped, flip_dir) / len(flipped)
    # s/case: the better of the two timed runs (the machine may be shared)
    row.seconds_per_case = previous + min(seconds / len(cases), flip_seconds)
    score = flip_consistency(pred_dir, flip_dir, sorted(cases), setting.axes, setting.ending)
    tally.flip_scores.setdefault(label, []).append(score)
    setting.log(f"[{label}] fold {fold}: flip consistency {score[0]:.5f} ({score[1]}/{score[2]} exact)")


def _finish_rows(tally: _Tally, num_folds: int, flip_check: bool) -> list[MethodResult]:
    """Means over folds."""
    rows = []
    for label, row in tally.rows.items():
        metrics = tally.metrics[label]
        row.seconds_per_case /= num_folds
        row.dice_per_fold = [float(m["foreground_mean"]["Dice"]) for m in metrics]
        row.dice_mean = float(np.mean(row.dice_per_fold))
        row.dice_std = float(np.std(row.dice_per_fold))
        for fold, m in zip(row.folds, metrics, strict=True):
            row.dice_per_case.update(_case_dice(m, fold))
        for key, name in tally.class_names.items():
            row.dice_per_class[name] = float(np.mean([_class_dice(m, key) for m in metrics]))
        if flip_check:
            scores = tally.flip_scores[label]
            row.flip_consistency = float(np.mean([s[0] for s in scores]))
            row.flip_consistent_cases = f"{sum(s[1] for s in scores)}/{sum(s[2] for s in scores)}"
        rows.append(row)
    return rows


def compare(
    dataset: str | int,
    specs: list[str | ResultSpec],
    output_dir: str | os.PathLike,
    folds: list[int] | None = None,
    test_images: str | os.PathLike | None = None,
    test_labels: str | os.PathLike | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    tile_step_size: float = 0.5,
    flip_check: bool = True,
    log=print,
) -> list[MethodResult]:
    """Run the comparison and write results.md/.csv/.json, dice.png and overlays.png to ``output_dir``.

    With ``test_images`` (nnU-Net raw format) and ``test_labels``, every fold predicts the same test set.
    Without them, each fold predicts its own validation cases (``splits_final.json``) from the raw
    ``imagesTr`` / ``labelsTr``: the cross-validation setting.
    """
    import torch
    from nnunetv2.utilities.file_path_utilities import load_json

    specs = _parse_specs(specs, test_images, test_labels)
    _let_nnunet_find_our_trainers()
    dataset_name = resolve_dataset(dataset)
    model_dirs = {spec: model_dir_for(dataset_name, spec) for spec in specs}
    folds = select_folds(model_dirs, folds)
    dataset_json = load_json(str(model_dirs[specs[0]] / "dataset.json"))
    test_sets = _test_sets(dataset_name, folds, dataset_json, test_images, test_labels, log)

    out_dir = Path(output_dir)
    _prepare_output(out_dir, overwrite)
    example = next(iter(next(iter(test_sets.values()))[0].values()))[0]
    axes = in_plane_axes(example)
    flipped_sets = _flipped_sets(test_sets, out_dir, axes, dataset_json["file_ending"], log) if flip_check else {}
    setting = _Setting(
        specs=specs,
        model_dirs=model_dirs,
        folds=folds,
        dataset_json=dataset_json,
        test_sets=test_sets,
        flipped_sets=flipped_sets,
        axes=axes,
        out_dir=out_dir,
        device=device,
        tile_step_size=tile_step_size,
        log=log,
    )

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    tally = _Tally()
    for spec in specs:
        for f in folds:
            _evaluate_fold(setting, tally, spec, f, flip_check)
    rows = _finish_rows(tally, len(folds), flip_check)
    write_outputs(out_dir, rows, list(tally.class_names.values()), test_sets, dataset_json)
    log(f"wrote {', '.join(OUTPUT_FILES)} to {out_dir}")
    return rows


def _case_dice(metrics: dict, fold: int) -> dict[str, float]:
    """Each case's Dice averaged over the foreground classes (classes absent from label and prediction,
    which nnU-Net scores NaN, are left out; a case with none left is NaN)."""
    scores = {}
    for case in metrics["metric_per_case"]:
        name = Path(case["reference_file"]).name
        values = [v["Dice"] for v in case["metrics"].values() if not np.isnan(v["Dice"])]
        scores[f"fold_{fold}/{name}"] = float(np.mean(values)) if values else float("nan")
    return scores


def _class_dice(metrics: dict, key: str) -> float:
    for k, v in metrics["mean"].items():
        if str(k) == key:
            return float(v["Dice"])
    raise KeyError(key)


# ---------------------------------------------------------------------------------------------------------------
# outputs

COLUMNS_AFTER_DICE = ("s/case", "params", "GFLOPs/pass", "GFLOPs/tile", "flip consistency", "exact flips")


def table_rows(rows: list[MethodResult], class_names: list[str]) -> tuple[list[str], list[list[str]]]:
    n = len(rows[0].folds) if rows else 0
    header = ["method", *(f"Dice {c}" for c in class_names), f"mean Dice ± std ({n} fold{'s' * (n != 1)})"]
    header += list(COLUMNS_AFTER_DICE)
    body = []
    for r in rows:
        body.append(
            [
                r.method,
                *(f"{r.dice_per_class[c]:.4f}" for c in class_names),
                f"{r.dice_mean:.4f} ± {r.dice_std:.4f}",
                f"{r.seconds_per_case:.3f}",
                f"{r.params:,}",
                f"{r.gflops_per_pass:.4f}",
                f"{r.gflops_per_tile:.4f}",
                "n/a" if np.isnan(r.flip_consistency) else f"{r.flip_consistency:.5f}",
                r.flip_consistent_cases or "n/a",
            ]
        )
    return header, body


def markdown_table(rows: list[MethodResult], class_names: list[str]) -> str:
    header, body = table_rows(rows, class_names)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def write_outputs(out_dir: Path, rows: list[MethodResult], class_names: list[str], test_sets, dataset_json) -> None:
    table = markdown_table(rows, class_names)
    note = (
        "\n\nDice: nnU-Net's evaluation (`compute_metrics_on_folder`), foreground mean per fold, then mean ± std "
        "over folds. s/case: wall time of predicting the test folder (preprocessing, sliding window, export) / "
        "cases, the better of the test-set and flipped-set runs, mean over folds. GFLOPs/tile: one forward pass "
        "on one patch (CNN: FlopCounterMode; EquiFlex: analytic, local attention over its window) x passes per tile. "
        "Flip consistency: "
        "fraction of voxels with pred(flip(x)) == flip(pred(x)) over cases and flips (3 per slice, 7 per volume), "
        "via nnU-Net's "
        "predictor, which runs the mirror-symmetric sliding window of nnunet-equiflex for EquiFlex networks and "
        "nnU-Net's own window (not mirror-symmetric: 1.0 only where padding and tiling happen to be) for the CNN and "
        'in rows marked "nnU-Net\'s window"; exact flips: case-flip pairs with no differing voxel.\n'
    )
    (out_dir / "results.md").write_text(table + note)
    header, body = table_rows(rows, class_names)
    with open(out_dir / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        raw_header = ["method", *(f"dice_{c}" for c in class_names), "dice_mean", "dice_std", "seconds_per_case"]
        raw_header += ["params", "gflops_per_pass", "gflops_per_tile", "passes", "flip_consistency", "exact_flips"]
        writer.writerow(raw_header)
        for r in rows:
            writer.writerow(
                [r.method, *(r.dice_per_class[c] for c in class_names), r.dice_mean, r.dice_std, r.seconds_per_case]
                + [r.params, r.gflops_per_pass, r.gflops_per_tile, r.passes, r.flip_consistency]
                + [r.flip_consistent_cases]
            )
    (out_dir / "results.json").write_text(
        json.dumps({"class_names": class_names, "rows": [asdict(r) for r in rows]}, indent=2)
    )
    _bar_chart(out_dir / "dice.png", rows, class_names)
    _overlays(out_dir / "overlays.png", rows, test_sets, dataset_json)


def _bar_chart(path: Path, rows: list[MethodResult], class_names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*class_names, "mean"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(4 + 2 * len(groups), 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        values = [r.dice_per_class[c] for c in class_names] + [r.dice_mean]
        errors = [0.0] * len(class_names) + [r.dice_std]
        ax.bar(np.arange(len(groups)) + i * width, values, width, yerr=errors, label=r.method, capsize=3)
        ax2.bar(i, r.flip_consistency if not np.isnan(r.flip_consistency) else 0.0, 0.8)
    ax.set_xticks(np.arange(len(groups)) + width * (len(rows) - 1) / 2, groups)
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("Dice (mean over folds; error bar: std over folds)")
    ax2.set_xticks(range(len(rows)), [r.method for r in rows], rotation=30, ha="right", fontsize=7)
    low = min([r.flip_consistency for r in rows if not np.isnan(r.flip_consistency)] or [0.9])
    ax2.set_ylim(max(0.0, low - 0.01), 1.0)
    ax2.set_title("flip consistency")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _overlays(path: Path, rows: list[MethodResult], test_sets, dataset_json, num_examples: int = 3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    fold0 = next(iter(test_sets))
    cases, labels_dir = test_sets[fold0]
    ending = dataset_json["file_ending"]
    names = sorted(cases)[:num_examples]
    columns = ["image", "ground truth", *(r.method for r in rows)]
    num_labels = max(int(np.max(v)) if not isinstance(v, list) else 1 for v in dataset_json["labels"].values())

    def load(p: Path) -> np.ndarray:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
        return a[a.shape[0] // 2] if a.ndim == 3 else a

    fig, axes = plt.subplots(len(names), len(columns), figsize=(2.2 * len(columns), 2.2 * len(names)), squeeze=False)
    for i, case in enumerate(names):
        image = load(cases[case][0])
        panels = [None, load(labels_dir / f"{case}{ending}")]
        panels += [load(Path(r.prediction_dirs[0]) / f"{case}{ending}") for r in rows]
        for j, seg in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(image, cmap="gray")
            if seg is not None:
                ax.imshow(np.ma.masked_equal(seg, 0), cmap="jet", vmin=0, vmax=max(1, num_labels), alpha=0.45)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(columns[j], fontsize=7)
        axes[i, 0].set_ylabel(case, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
