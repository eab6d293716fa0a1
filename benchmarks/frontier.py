"""The Dice-cost frontier: nnU-Net's CNN and every EquiFlex preset, same data, fold and iteration budget.

Through nnU-Net's real commands on a synthetic cardiac dataset made hard enough to separate the
networks (``synthetic_cardiac --difficulty hard``: thin myocardium and RV, more shape, intensity,
noise and shading variation):

1. write the dataset; ``nnUNetv2_plan_and_preprocess -d D -c 2d``;
2. ``nnunet-equiflex plan -d D --batch-size B`` with the CNN plan's batch size, so every network
   trains on the same patch (nnU-Net's, a multiple of 8) and batch; the named preset trainers
   (``EquiFlexTrainerFlip0`` ...) bring their network shape;
3. ``nnUNetv2_train D 2d 0 -tr <trainer>_budget`` for each network with the same budget
   (``EQUIFLEX_BUDGET``: epochs x iterations, validation iterations);
4. ``nnunet-equiflex compare`` on the held-out test slices: Dice per class (nnU-Net's evaluation),
   flip consistency; the CNN and the group-none ablation with and without mirroring TTA;
5. timing, round-robin over all rows on the same machine state: seconds per case through
   ``nnUNetPredictor.predict_single_npy_array`` (preprocessing, sliding window, export to a
   segmentation) and the training step (forward + backward + optimizer step at the plans' batch and
   patch); FLOPs per tile (EquiFlex analytic, the CNN by FlopCounterMode) and parameters.

Prints one table (also ``frontier.md``/``.csv``/``.json``) and ``frontier.png`` (mean Dice against
s/case), states the budget, the machine and the torch version, and applies the default-choice
rule: the fastest EquiFlex preset whose mean Dice is within 1 point of the CNN with TTA. Every
step leaves a marker; a rerun resumes (``--timing-only`` repeats just the timing, e.g. on an idle
machine).

``--3d`` runs the same steps for ``3d_fullres`` on the 3D demo volumes (``synthetic_volumes``):
nnU-Net's 3D CNN (with its 8-pass TTA and without) against ``vit_s8_3d``, ``vit_ti8_3d`` and
``tiny3d``; flip consistency over all 7 non-identity flips of a volume.

    python benchmarks/frontier.py WORK                 # the README's run (hours on 2 CPU cores)
    python benchmarks/frontier.py WORK --quick         # tiny data, tiny budget, tiny preset: a smoke run
    python benchmarks/frontier.py WORK3D --3d          # 3d_fullres: 24 / 6 volumes, 10 x 40 iterations
    python benchmarks/frontier.py WORK3D --3d --quick  # 3D smoke run: CNN and tiny3d
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import functools
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import allow_many_compiles
from frontier_records import data_digest, load_records, make_record, untrained_model_dir, write_record

from nnunet_equiflex.main_job import TRAINING_PROGRESS, Steps, job_env, run_logged


@dataclasses.dataclass(frozen=True)
class Profile:
    """One frontier: the dataset, the nnU-Net configuration and the networks compared on it."""

    configuration: str
    dataset_id: int
    dataset_name: str
    networks: list[tuple[str, str, str]]  # (label, trainer without the _budget suffix, plans); the CNN first
    settings: dict[str, dict]  # "default" and "quick": data size, budget, timing repeats
    quick_networks: tuple[str, ...]
    cases: str  # what a case is, for the header

    def spec(self, trainer: str, plans: str) -> str:
        """The result folder name of a budget run: ``<trainer>_budget__<plans>__<configuration>``."""
        return f"{trainer}_budget__{plans}__{self.configuration}"

    def generate(self, raw: str, settings: dict) -> None:
        if self.configuration == "2d":
            from nnunet_equiflex.dataset_conversion.synthetic_cardiac import generate_synthetic_cardiac

            generate_synthetic_cardiac(
                raw, self.dataset_id, settings["num_train"], settings["num_test"], seed=0,
                size_range=tuple(settings["size_range"]), overwrite=True, name="SyntheticCardiacHard",
                difficulty="hard",
            )  # fmt: skip
        else:
            from nnunet_equiflex.dataset_conversion.synthetic_volumes import generate_synthetic_volumes

            generate_synthetic_volumes(raw, self.dataset_id, settings["num_train"], settings["num_test"], seed=0,
                                       overwrite=True, name="SyntheticVolumesFrontier")  # fmt: skip


PROFILE_2D = Profile(
    configuration="2d",
    dataset_id=902,
    dataset_name="Dataset902_SyntheticCardiacHard",
    networks=[
        ("nnU-Net CNN", "nnUNetTrainer", "nnUNetPlans"),
        ("EquiFlex vit_s8 (4 lifted, 4 global)", "EquiFlexTrainerViTS8", "EquiFlexPlans"),
        ("EquiFlex vit_s8_flip2", "EquiFlexTrainerFlip2", "EquiFlexPlans"),
        ("EquiFlex vit_s8_flip0", "EquiFlexTrainerFlip0", "EquiFlexPlans"),
        ("EquiFlex vit_ti8", "EquiFlexTrainerViTTi8", "EquiFlexPlans"),
        ("EquiFlex mini4", "EquiFlexTrainerMini4", "EquiFlexPlans"),
        ("EquiFlex micro4", "EquiFlexTrainerMicro4", "EquiFlexPlans"),
        ("EquiFlex tiny, lifted refinement", "EquiFlexTrainerTinyLiftRef", "EquiFlexPlans"),
        ("EquiFlex small_lift4", "EquiFlexTrainerSmallLift4", "EquiFlexPlans"),
        ("EquiFlex tiny_lift4", "EquiFlexTrainerTinyLift4", "EquiFlexPlans"),
        ("EquiFlex tiny_lifthead", "EquiFlexTrainerTinyLiftHead", "EquiFlexPlans"),
        ("EquiFlex tiny_lift4_rpb", "EquiFlexTrainerTinyLift4RPB", "EquiFlexPlans"),
        ("EquiFlex tiny_lift4_conv", "EquiFlexTrainerTinyLift4Conv", "EquiFlexPlans"),
        ("EquiFlex small_lift4_conv", "EquiFlexTrainerSmallLift4Conv", "EquiFlexPlans"),
        ("EquiFlex tiny_conv", "EquiFlexTrainerTinyConv", "EquiFlexPlans"),
        ("EquiFlex tiny_conv_cn", "EquiFlexTrainerTinyConvCN", "EquiFlexPlans"),
        ("EquiFlex tiny", "EquiFlexTrainerTiny", "EquiFlexPlans"),
        ("ViT-S/8 flip0, group none", "FlexTrainerFlip0", "EquiFlexPlans"),
    ],
    settings={
        "default": dict(num_train=200, num_test=30, size_range=[96, 128], budget=[12, 50, 5], repeats=3),
        "quick": dict(num_train=16, num_test=4, size_range=[64, 72], budget=[2, 4, 2], repeats=1),
    },
    quick_networks=("nnUNetTrainer", "EquiFlexTrainerTiny"),
    cases="slices of {size_range[0]}-{size_range[1]} px (synthetic_cardiac --difficulty hard)",
)
# 3d_fullres on the 3D demo volumes (thick 3 mm slices, about 16-20 x 40-48 x 40-48 voxels)
PROFILE_3D = Profile(
    configuration="3d_fullres",
    dataset_id=906,
    dataset_name="Dataset906_SyntheticVolumesFrontier",
    networks=[
        ("nnU-Net CNN", "nnUNetTrainer", "nnUNetPlans"),
        ("EquiFlex vit_s8_3d", "EquiFlexTrainerViTS8_3D", "EquiFlexPlans"),
        ("EquiFlex vit_ti8_3d", "EquiFlexTrainerViTTi8_3D", "EquiFlexPlans"),
        ("EquiFlex tiny3d", "EquiFlexTrainerTiny3D", "EquiFlexPlans"),
    ],
    settings={
        "default": dict(num_train=24, num_test=6, budget=[10, 40, 5], repeats=3, configuration="3d_fullres"),
        "quick": dict(num_train=6, num_test=1, budget=[2, 4, 2], repeats=1, configuration="3d_fullres"),
    },
    quick_networks=("nnUNetTrainer", "EquiFlexTrainerTiny3D"),
    cases="volumes of 16-20 x 40-48 x 40-48 voxels at 3 x 1 x 1 mm (synthetic_volumes)",
)


def equivariant_presets(profiles: tuple[Profile, ...]) -> dict[str, str]:
    """The preset of every equivariant EquiFlex trainer of the profiles (the rule's candidates), read off the
    trainer classes: the CNN and the group-none ablations are not candidates."""
    from nnunet_equiflex.network import preset_kwargs
    from nnunet_equiflex.trainers import equiflex_trainers

    presets = {}
    for profile in profiles:
        for _, trainer, _ in profile.networks:
            cls = getattr(equiflex_trainers, trainer, None)
            if not (isinstance(cls, type) and issubclass(cls, equiflex_trainers.EquiFlexTrainer)):
                continue  # nnU-Net's CNN
            if preset_kwargs(cls.network_preset, **cls.network_overrides)["group"] != "none":
                presets[trainer] = cls.network_preset
    return presets


PRESET_OF_TRAINER = equivariant_presets((PROFILE_2D, PROFILE_3D))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work_dir", help="work folder (nnU-Net folders, logs, outputs); a rerun resumes")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data and budget, CNN and tiny only")
    parser.add_argument(
        "--3d", dest="three_d", action="store_true", help="3d_fullres on synthetic volumes: 3D presets vs the 3D CNN"
    )
    parser.add_argument("--epochs", type=int, help="training epochs (default 12; 3D 10)")
    parser.add_argument("--iterations", type=int, help="training iterations per epoch (default 50; 3D 40)")
    parser.add_argument(
        "--networks", nargs="*", help="trainer names to include, trained in this order (default: all of the profile)"
    )
    parser.add_argument("--repeats", type=int, help="timing repeats per row (median)")
    parser.add_argument("--timing-only", action="store_true", help="redo only the timing and the table")
    parser.add_argument(
        "--train-only", action="store_true", help="stop after training (time later, on an idle machine)"
    )
    parser.add_argument(
        "--records",
        help="folder of per-network records (Dice on the test slices, from earlier runs, maybe other machines): "
        "networks recorded there are not retrained, networks trained here are recorded there",
    )
    parser.add_argument(
        "--record-only", action="store_true", help="stop after training, compare and writing the records"
    )
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def run_settings(args: argparse.Namespace) -> dict:
    """The run's settings; ``settings["profile"]`` (2D or 3D) is not saved: the other keys tell the runs apart."""
    profile = PROFILE_3D if args.three_d else PROFILE_2D
    settings = dict(profile.settings["quick" if args.quick else "default"])
    budget = list(settings["budget"])
    budget[0] = args.epochs or budget[0]
    budget[1] = args.iterations or budget[1]
    settings["budget"] = budget
    settings["repeats"] = args.repeats or settings["repeats"]
    known = [t for _, t, _ in profile.networks]
    names = args.networks or (profile.quick_networks if args.quick else known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"unknown trainers {unknown}; choose from {known}")
    settings["networks"] = [n for n in profile.networks if n[1] in names]  # the table's order
    settings["training_order"] = list(names)
    settings["profile"] = profile
    return settings


def require_cnn(networks: list[tuple[str, str, str]]) -> None:
    if not networks or networks[0][1] != "nnUNetTrainer":
        raise SystemExit("the networks must include nnUNetTrainer (trained here or recorded): the CNN is every "
                         "ratio's baseline")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# steps 1-4: nnU-Net's commands


def prepare(work: Path, settings: dict, env: dict, steps: Steps) -> None:
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    profile = settings["profile"]
    dataset, configuration = str(profile.dataset_id), profile.configuration
    steps.run("dataset", lambda: profile.generate(env["nnUNet_raw"], settings))
    steps.run(
        "plan_and_preprocess",
        lambda: run_logged(
            ["nnUNetv2_plan_and_preprocess", "-d", dataset, "-c", configuration, "-np", "2"],
            env,
            logs / "plan_and_preprocess.txt",
            show=lambda line: "%|" not in line and len(line) < 200,
        ),  # fmt: skip
    )
    cnn_batch = str(load_plans(env, "nnUNetPlans", profile)["configurations"][configuration]["batch_size"])
    plan = ["nnunet-equiflex", "plan", "-d", dataset, "-c", configuration, "--batch-size", cnn_batch, "--overwrite"]
    steps.run("plan_equiflex", lambda: run_logged(plan, env, logs / "plan.txt"))


def train(work: Path, settings: dict, env: dict, steps: Steps, device: str, trainers: list[str]) -> None:
    profile, logs = settings["profile"], work / "logs"
    dataset, configuration = str(profile.dataset_id), profile.configuration
    results = Path(env["nnUNet_results"]) / profile.dataset_name
    plans_of = {t: p for _, t, p in profile.networks}
    for trainer in trainers:
        plans = plans_of[trainer]
        fold_dir = results / profile.spec(trainer, plans) / "fold_0"

        def train(trainer=trainer, plans=plans, fold_dir=fold_dir) -> None:
            args = ["nnUNetv2_train", dataset, configuration, "0", "-tr", f"{trainer}_budget", "-p", plans]
            args += ["-device", device]
            if (fold_dir / "checkpoint_latest.pth").is_file():
                args.append("--c")  # resume an interrupted training
            show = lambda line: bool(TRAINING_PROGRESS.search(line))  # noqa: E731
            run_logged(args, env, logs / f"train_{trainer}.txt", show=show)

        steps.run(f"train_{trainer}", train)


def load_plans(env: dict, plans: str, profile: Profile) -> dict:
    return json.loads((Path(env["nnUNet_preprocessed"]) / profile.dataset_name / f"{plans}.json").read_text())


def evaluate(work: Path, profile: Profile, env: dict, steps: Steps, device: str, networks: list) -> None:
    """``compare`` of the networks trained in this folder on the test cases (``work/compare``)."""
    raw = Path(env["nnUNet_raw"]) / profile.dataset_name

    def compare_step() -> None:
        run_compare(profile, networks, raw, work / "compare", env, device, work / "logs" / "compare.txt")

    subset = "" if len(networks) == len(profile.networks) else "_" + "_".join(t for _, t, _ in networks)
    steps.run(f"compare{subset}", compare_step)


def run_compare(
    profile: Profile, networks, data: Path, out: Path, env: dict, device: str, log: Path, flip_check: bool = True
) -> Path:
    """``nnunet-equiflex compare`` of the budget runs of ``networks`` (fold 0) on the test set of the raw dataset
    folder ``data`` (``imagesTs``, ``labelsTs``) into ``out``; returns its ``results.json``."""
    specs = [profile.spec(t, p) for _, t, p in networks]
    args = ["nnunet-equiflex", "compare", "-d", str(profile.dataset_id), "-r", *specs, "-f", "0"]
    args += ["-i", str(data / "imagesTs"), "-l", str(data / "labelsTs"), "-o", str(out), "--overwrite"]
    args += ["--device", device] + ([] if flip_check else ["--no-flip-check"])
    run_logged(args, env, log, show=lambda line: not line.startswith("|"))
    return out / "results.json"


def record_trained(work: Path, profile: Profile, env: dict, saved: dict, digest: str, folder: Path, networks) -> None:
    """One record per network trained here: its compare rows and the epoch time of its training log."""
    rows = json.loads((work / "compare" / "results.json").read_text())["rows"]
    results = Path(env["nnUNet_results"]) / profile.dataset_name
    for _, trainer, plans in networks:
        name = profile.spec(trainer, plans)
        own = [r for r in rows if r["spec"] == name]
        epoch_s = training_log_seconds_per_epoch(results / name)
        path = write_record(folder, make_record(saved, digest, trainer, name, own, epoch_s))
        print(f"record: {path}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# step 5: timing, round-robin


def trained_predictor(model_dir: Path, use_mirroring: bool, device: torch.device):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring, device=device,
        perform_everything_on_device=device.type != "cpu", verbose=False, verbose_preprocessing=False,
        allow_tqdm=False,
    )  # fmt: skip
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(0,))
    return predictor


def test_cases(raw: Path) -> list[tuple[np.ndarray, dict]]:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    reader = SimpleITKIO()
    return [reader.read_images([str(p)]) for p in sorted((raw / "imagesTs").glob("*_0000.nii.gz"))]


def training_step(predictor, device: torch.device):
    """One optimizer step of the trained architecture at its plans' batch and patch (random data): a copy of
    the predictor's network in training mode, the CNN with its deep supervision on, as nnU-Net trains them."""
    import torch.nn.functional as F

    network = copy.deepcopy(predictor.network).to(device).train()
    equiflex = hasattr(network, "arch_kwargs")
    if not equiflex:
        network.decoder.deep_supervision = True  # what nnU-Net's set_deep_supervision_enabled switches
    config = predictor.configuration_manager
    batch, patch = config.batch_size, tuple(config.patch_size)
    x = torch.randn(batch, len(predictor.dataset_json["channel_names"]), *patch, device=device)
    target = torch.randint(0, predictor.label_manager.num_segmentation_heads, (batch, *patch), device=device)
    if equiflex:
        optimizer = torch.optim.AdamW(network.parameters(), lr=3e-4, weight_decay=5e-2)
    else:
        optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        outs = network(x)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        loss = sum(F.cross_entropy(o, target[downsampled(patch, o.shape[2:])]) for o in outs)
        loss.backward()
        optimizer.step()

    return step


def downsampled(patch: tuple[int, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The index that subsamples a (batch, *patch) target to a deep-supervision output's grid, on every axis."""
    return (slice(None), *(slice(None, None, p // n) for p, n in zip(patch, shape)))


def measure_round_robin(calls: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of every callable, timed A B C A B C ... after one warm-up call each."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def timing(settings: dict, env: dict, device: torch.device, model_dirs: dict[str, Path]) -> dict:
    """s/case through the predictor (CNN and group-none rows also with TTA) and the training step, per row;
    ``model_dirs``: each network's model folder (trained here, or an untrained copy of a recorded one)."""
    from nnunet_equiflex.compare import count_flops

    # One process times every row: past dynamo's recompile limit (8 graphs of the compiled window attention, a few
    # per network) the later rows would run it eagerly and read slower than a user's single-network process.
    allow_many_compiles()
    profile = settings["profile"]
    cases = test_cases(Path(env["nnUNet_raw"]) / profile.dataset_name)
    predict_calls, step_calls, info = {}, {}, {}
    for label, trainer, plans in settings["networks"]:
        model_dir = model_dirs[trainer]
        with contextlib.redirect_stdout(io.StringIO()):
            predictor = trained_predictor(model_dir, use_mirroring=False, device=device)
        mirrors = tuple(predictor.allowed_mirroring_axes or ())
        patch = tuple(predictor.configuration_manager.patch_size)
        network = predictor.network
        flops = count_flops(network, len(predictor.dataset_json["channel_names"]), patch)
        params = sum(p.numel() for p in network.parameters())
        modes = [(False, 1)] + ([(True, 2 ** len(mirrors))] if mirrors else [])
        for use_mirroring, passes in modes:
            row = f"{label} + TTA ({passes} passes)" if use_mirroring else f"{label} (1 pass)"
            with contextlib.redirect_stdout(io.StringIO()):
                row_predictor = trained_predictor(model_dir, use_mirroring, device) if use_mirroring else predictor
            predict_calls[row] = functools.partial(predict_cases, row_predictor, cases)
            name = profile.spec(trainer, plans)
            info[row] = dict(trainer=trainer, spec=name, use_mirroring=use_mirroring, passes=passes,
                             gflops_per_tile=flops * passes / 1e9, params=params, patch=list(patch),
                             batch=predictor.configuration_manager.batch_size)  # fmt: skip
        step_calls[label] = training_step(predictor, device)
    print(f"timing {len(predict_calls)} prediction rows over {len(cases)} test cases, round-robin ...", flush=True)
    seconds = measure_round_robin(predict_calls, settings["repeats"])
    print(f"timing {len(step_calls)} training steps, round-robin ...", flush=True)
    steps = measure_round_robin(step_calls, settings["repeats"])
    for row, meta in info.items():
        meta["seconds_per_case"] = seconds[row] / len(cases)
        meta["train_s_per_iteration"] = steps[row.split(" (1 pass)")[0].split(" + TTA")[0]]
    return info


def predict_cases(predictor, cases) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        for image, properties in cases:
            predictor.predict_single_npy_array(image, properties, None, None, False)


def training_log_seconds_per_epoch(model_dir: Path) -> float:
    """Median wall time of an epoch in nnU-Net's own log of the run (training + validation iterations)."""
    checkpoint = torch.load(model_dir / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    log = checkpoint["logging"]
    return float(np.median(np.array(log["epoch_end_timestamps"]) - np.array(log["epoch_start_timestamps"])))


# ---------------------------------------------------------------------------------------------------------------
# the table, the rule, the chart


def dice_rows(rows: list[dict]) -> dict[tuple[str, bool], dict]:
    """compare's rows by (result spec, TTA), the first row of each (nnU-Net's own predictor)."""
    by_key: dict[tuple[str, bool], dict] = {}
    for row in rows:
        by_key.setdefault((row["spec"], row["use_mirroring"]), row)
    return by_key


def cnn_tta_row(table: list[dict]) -> dict:
    """The CNN with mirroring TTA: every ratio's baseline."""
    return next(r for r in table if r["trainer"] == "nnUNetTrainer" and r["use_mirroring"])


def build_table(info: dict, compare_rows: list[dict], epoch_s: dict[str, float]) -> list[dict]:
    """One row per timed row: its Dice from compare (here or recorded), its cost from this run's timing."""
    dice = dice_rows(compare_rows)
    table = []
    for row, meta in info.items():
        scores = dice[(meta["spec"], meta["use_mirroring"])]
        table.append(dict(row=row, **meta, dice_per_class=scores["dice_per_class"], dice_mean=scores["dice_mean"],
                          flip_consistency=scores["flip_consistency"], dice_per_case=scores.get("dice_per_case", {}),
                          train_s_per_epoch_log=epoch_s[meta["trainer"]]))  # fmt: skip
    baseline = cnn_tta_row(table)
    for r in table:
        r["speedup_vs_cnn_tta"] = baseline["seconds_per_case"] / r["seconds_per_case"]
        r["dice_vs_cnn_tta_points"] = 100 * (r["dice_mean"] - baseline["dice_mean"])
    return table


def choose_default(table: list[dict]) -> dict | None:
    """The fastest EquiFlex preset (one pass) whose mean Dice is within 1 point of the CNN with TTA."""
    baseline = cnn_tta_row(table)
    eligible = [
        r for r in table if r["trainer"] in PRESET_OF_TRAINER and r["dice_mean"] >= baseline["dice_mean"] - 0.01
    ]
    return min(eligible, key=lambda r: r["seconds_per_case"]) if eligible else None


def closest_preset(table: list[dict]) -> dict | None:
    """Where no preset qualifies: the EquiFlex preset with the highest mean Dice (the faster one on a tie)."""
    presets = [r for r in table if r["trainer"] in PRESET_OF_TRAINER]
    return min(presets, key=lambda r: (-round(r["dice_mean"], 4), r["seconds_per_case"]), default=None)


def rule_line(table: list[dict]) -> str:
    rule = "default rule (fastest EquiFlex preset within 1 point of the CNN with TTA): "
    chosen = choose_default(table)
    if chosen is None:
        chosen = closest_preset(table)
        if chosen is None:
            return rule + "no EquiFlex preset in this run"
        rule += "no preset qualifies; fallback (highest mean Dice): "
    return rule + (
        f"{chosen['trainer']} ({PRESET_OF_TRAINER[chosen['trainer']]}), {chosen['speedup_vs_cnn_tta']:.2f}x faster "
        f"per case, {chosen['dice_vs_cnn_tta_points']:+.2f} points"
    )


FAILED_CASE_DICE = 0.5  # a case whose mean Dice is below this missed the structures, not just their boundaries


def case_cells(row: dict) -> list[str]:
    """Median per-case mean Dice and the cases below FAILED_CASE_DICE: a gap in the mean from a few missed
    cases reads differently from one spread over every boundary. "-" for records written before per-case Dice."""
    values = [v for v in row.get("dice_per_case", {}).values() if not np.isnan(v)]
    if not values:
        return ["-", "-"]
    failed = sum(v < FAILED_CASE_DICE for v in values)
    return [f"{np.median(values):.4f}", f"{failed}/{len(values)}"]


def markdown(table: list[dict]) -> str:
    classes = list(table[0]["dice_per_class"])
    header = ["method", *(f"Dice {c}" for c in classes), "mean Dice", "vs CNN+TTA (points)",
              "median case Dice", f"cases < {FAILED_CASE_DICE}", "s/case",
              "speed-up vs CNN+TTA", "GFLOPs/tile", "params", "train s/iter (step)", "train s/epoch (log)",
              "flip consistency"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table:
        cells = [r["row"], *(f"{r['dice_per_class'][c]:.4f}" for c in classes), f"{r['dice_mean']:.4f}",
                 f"{r['dice_vs_cnn_tta_points']:+.2f}", *case_cells(r), f"{r['seconds_per_case']:.4f}",
                 f"{r['speedup_vs_cnn_tta']:.2f}x", f"{r['gflops_per_tile']:.2f}", f"{r['params']:,}",
                 f"{r['train_s_per_iteration']:.3f}", f"{r['train_s_per_epoch_log']:.1f}",
                 f"{r['flip_consistency']:.5f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(path: Path, table: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in table:
        marker = "s" if r["trainer"] == "nnUNetTrainer" else ("^" if r["trainer"].startswith("Flex") else "o")
        ax.scatter(r["seconds_per_case"], r["dice_mean"], marker=marker, s=50)
        ax.annotate(r["row"], (r["seconds_per_case"], r["dice_mean"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")  # fmt: skip
    baseline = cnn_tta_row(table)
    ax.set_xscale("log")
    seconds = [r["seconds_per_case"] for r in table]
    ax.set_xlim(min(seconds) / 1.5, max(seconds) * 4)  # room for the labels right of the points
    ax.axhline(baseline["dice_mean"] - 0.01, color="grey", linestyle=":", linewidth=1)
    ax.text(0.01, baseline["dice_mean"] - 0.01, "CNN+TTA - 1 point", fontsize=7, va="bottom",
            transform=ax.get_yaxis_transform())  # fmt: skip
    ax.set_xlabel("seconds per case through nnU-Net's predictor (log scale)")
    ax.set_ylabel("mean Dice (foreground classes)")
    ax.set_title("Dice-cost frontier: EquiFlex presets vs nnU-Net's CNN (same budget, fold 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_line(device: torch.device) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return (
        f"machine: {device.type} ({where}), {os.cpu_count()} logical cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, python {platform.python_version()}"
    )


def write_outputs(out: Path, table: list[dict], header: list[str]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    rule = rule_line(table)
    text = "\n".join(header) + "\n\n" + markdown(table) + "\n\n" + rule + "\n"
    (out / "frontier.md").write_text(text)
    (out / "frontier.json").write_text(json.dumps({"header": header, "rows": table, "rule": rule}, indent=2))
    with open(out / "frontier.csv", "w", newline="") as handle:
        nested = ("dice_per_class", "dice_per_case")
        writer = csv.DictWriter(handle, fieldnames=[k for k in table[0] if k not in nested])
        writer.writeheader()
        writer.writerows({k: v for k, v in r.items() if k not in nested} for r in table)
    chart(out / "frontier.png", table)
    return text


def open_work_folder(work: Path, settings: dict) -> dict:
    """The data and the budget define a run folder (``settings.json``); the networks may be any subset of it."""
    work.mkdir(parents=True, exist_ok=True)
    (work / ".steps").mkdir(exist_ok=True)
    record = work / "settings.json"
    saved = {k: v for k, v in settings.items() if k not in ("repeats", "networks", "training_order", "profile")}
    recorded = json.loads(record.read_text()) if record.is_file() else None
    if recorded is not None:
        recorded = {k: v for k, v in recorded.items() if k != "networks"}  # older records listed the networks
    if recorded is not None and recorded != json.loads(json.dumps(saved)):
        raise SystemExit(f"{work} holds a frontier run with other settings ({record}); choose another folder")
    record.write_text(json.dumps(saved, indent=2))
    return saved


def run_env(work: Path, settings: dict) -> dict:
    env = job_env(work)
    env["EQUIFLEX_BUDGET"] = ",".join(str(b) for b in settings["budget"])
    env.pop("EQUIFLEX_LR", None)  # the frontier trains every network with its trainer's own learning rate
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer")})
    return env


def header_lines(settings: dict, env: dict, device: torch.device, records: dict, records_dir) -> list[str]:
    epochs, iterations, val_iterations = settings["budget"]
    profile = settings["profile"]
    plans = load_plans(env, "EquiFlexPlans", profile)["configurations"][profile.configuration]
    header = [
        "# Dice-cost frontier (benchmarks/frontier.py)",
        f"command: {' '.join([os.path.relpath(sys.executable), *sys.argv])}",
        machine_line(device),
        f"data: {profile.dataset_name} ({profile.configuration}), {settings['num_train']} training / "
        f"{settings['num_test']} test {profile.cases.format(**settings)}, fold 0",
        f"budget (every network): {epochs} epochs x {iterations} iterations (+{val_iterations} validation iterations "
        f"per epoch), batch {plans['batch_size']}, patch {plans['patch_size']} = {epochs * iterations} iterations",
        "Dice: nnU-Net's evaluation on the test cases; s/case: predict_single_npy_array per test case (median of "
        f"{settings['repeats']} round-robin repeats); train s/iter: one optimizer step at the plans' batch and patch "
        "(round-robin); train s/epoch: median epoch wall time in nnU-Net's training log (other jobs may have shared "
        "the machine then); GFLOPs/tile: one forward pass x passes (EquiFlex analytic, CNN FlopCounterMode)",
    ]
    used = [r for t, r in records.items() if t in {n[1] for n in settings["networks"]}]
    if used:
        trained = "; ".join(f"{r['trainer']}: {r['trained_with']}" for r in used)
        header.append(f"Dice and s/epoch of {len(used)} networks from the records in {records_dir} (same data digest "
                      f"and budget; trained with {trained}); every row is timed in this run")  # fmt: skip
    chosen = {t for _, t, _ in settings["networks"]}
    missing = [label for label, trainer, _ in profile.networks if trainer not in chosen]
    if missing:
        header.append(f"not in this run (choose them with --networks): {', '.join(missing)}")
    return header


def table_inputs(work: Path, profile: Profile, env: dict, here: list, records: dict) -> tuple[dict, list[dict], dict]:
    """Model folders to time, compare rows and training-log epoch times: from this folder or the records."""
    results = Path(env["nnUNet_results"]) / profile.dataset_name
    model_dirs = {t: results / profile.spec(t, p) for _, t, p in here}
    rows = json.loads((work / "compare" / "results.json").read_text())["rows"] if here else []
    epoch_s = {t: training_log_seconds_per_epoch(model_dirs[t]) for t in model_dirs}
    plans_of = {t: p for _, t, p in profile.networks}
    for trainer, record in records.items():
        model_dirs[trainer] = untrained_model_dir(str(profile.dataset_id), trainer + "_budget", plans_of[trainer], env,
                                                  work / "untrained_for_timing")  # fmt: skip
        rows += record["compare_rows"]
        epoch_s[trainer] = record["train_s_per_epoch_log"]
    return model_dirs, rows, epoch_s


def main() -> None:
    args = parse_args()
    settings = run_settings(args)
    work = Path(args.work_dir).resolve()
    saved = open_work_folder(work, settings)
    env = run_env(work, settings)
    steps = Steps(work)
    prepare(work, settings, env, steps)
    profile = settings["profile"]
    records_dir = Path(args.records).resolve() if args.records else None
    digest = data_digest(Path(env["nnUNet_raw"]) / profile.dataset_name) if records_dir else ""
    selected = {t for _, t, _ in settings["networks"]}
    records = load_records(records_dir, saved, digest) if records_dir else {}
    records = {t: r for t, r in records.items() if t in selected}
    here = [n for n in settings["networks"] if n[1] not in records]
    if not args.timing_only:
        train(work, settings, env, steps, args.device, [t for t in settings["training_order"] if t not in records])
        if args.train_only:
            print(f"trained: {', '.join(t for _, t, _ in here)}")
            return
        if here:
            evaluate(work, profile, env, steps, args.device, here)
        if records_dir and here:
            record_trained(work, profile, env, saved, digest, records_dir, here)
        if args.record_only:
            return
    require_cnn(settings["networks"])
    device = torch.device(args.device)
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "2")))
    model_dirs, compare_rows, epoch_s = table_inputs(work, profile, env, here, records)
    table = build_table(timing(settings, env, device, model_dirs), compare_rows, epoch_s)
    header = header_lines(settings, env, device, records, records_dir)
    print(write_outputs(work / "frontier", table, header))
    print(f"outputs: {work / 'frontier'} (frontier.md, .csv, .json, .png)")


if __name__ == "__main__":
    main()
