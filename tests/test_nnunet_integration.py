"""nnU-Net glue: resuming, the predictor's mirror consistency, trainer discovery, plan checks."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from nnunet_env import nnunet_env, run
from nnunet_equiflex.discovery import SHIM_NAME, nnunet_trainer_dir, trainers_dir
from nnunet_equiflex.schedules import warmup_poly_factor

pytestmark = pytest.mark.slow


@pytest.fixture
def in_process_env(trained_toy, monkeypatch):
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(key, trained_toy["env"][key])
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # single-threaded data loading inside the test process
    return trained_toy


def _run_epochs(trainer, epochs: int) -> None:
    """nnU-Net's run_training loop, stopped after ``epochs`` as if the job had been killed."""
    trainer.on_train_start()
    for _ in range(epochs):
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        outputs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(trainer.num_iterations_per_epoch)]
        trainer.on_train_epoch_end(outputs)
        with torch.no_grad():
            trainer.on_validation_epoch_start()
            val = [
                trainer.validation_step(next(trainer.dataloader_val))
                for _ in range(trainer.num_val_iterations_per_epoch)
            ]
            trainer.on_validation_epoch_end(val)
        trainer.on_epoch_end()


def test_continue_restores_epoch_optimizer_and_schedule(in_process_env):
    from nnunetv2.run.run_training import get_trainer_from_args

    toy = in_process_env
    trainer = get_trainer_from_args("901", "2d", 1, toy["trainer"], "EquiFlexPlans", device=torch.device("cpu"))
    trainer.save_every = 1
    _run_epochs(trainer, 2)
    fold = toy["model_dir"] / "fold_1"
    interrupted = torch.load(fold / "checkpoint_latest.pth", weights_only=False)
    assert interrupted["current_epoch"] == 2

    log = run(
        ["nnUNetv2_train", "901", "2d", "1", "-tr", toy["trainer"], "-p", "EquiFlexPlans", "-device", "cpu", "--c"],
        toy["env"],
        toy["logs"] / "train_continue.txt",
    )
    assert "Epoch 2" in log and "Epoch 0\n" not in log
    final = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    assert final["current_epoch"] == trainer.num_epochs == 4
    # AdamW's step counter only reaches all iterations if the optimizer state was restored.
    steps = {float(s["step"]) for s in final["optimizer_state"]["state"].values()}
    assert steps == {4.0 * trainer.num_iterations_per_epoch}
    # The learning rate of every epoch, before and after the restart, is the uninterrupted schedule's.
    expected = [trainer.initial_lr * warmup_poly_factor(e, 4, 0) for e in range(4)]
    assert np.allclose(final["logging"]["lrs"], expected)


def _cpu_predictor(predictor_class, model_dir):
    predictor = predictor_class(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=True,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(0,))
    return predictor


@pytest.fixture
def predictor(in_process_env):
    """nnU-Net's own predictor from Python: finding our trainer imports the module that patches it."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_equiflex.nnunet_patch import uses_symmetric_window

    predictor = _cpu_predictor(nnUNetPredictor, in_process_env["model_dir"])
    assert uses_symmetric_window(predictor)
    return predictor


def _predict(predictor, image: np.ndarray):
    # The plan's own spacing: no resampling, so the sizes below are the sizes the sliding window sees.
    props = {"spacing": [8.0, *predictor.configuration_manager.spacing]}
    seg, probs = predictor.predict_single_npy_array(image[None, None], props, None, None, True)
    return seg[0], probs[:, 0]


# Sizes where nnU-Net's own padding and tile placement are mirror-symmetric for the 48x48 patch and one
# tile covers the image: no padding, and an even padding difference.
SINGLE_TILE_SIZES = [(48, 48), (40, 44)]
# Several tiles with symmetric starts in nnU-Net's own window ([0, 16] and [0, 16, 32]).
MULTI_TILE_SIZES = [(64, 64), (80, 64)]


def _mirror_agreement(predictor, size):
    from nnunet_env import toy_case

    image, _ = toy_case(np.random.default_rng(1), *size)
    seg, probs = _predict(predictor, image)
    assert len(np.unique(seg)) > 1  # a real prediction, not all background
    for axes in [(0,), (1,), (0, 1)]:
        seg_m, probs_m = _predict(predictor, np.flip(image, axes).copy())
        yield np.mean(seg_m == np.flip(seg, axes)), np.abs(probs_m - np.flip(probs, [a + 1 for a in axes])).max()


def _tie_margin(predictor, size):
    """Per flip: the largest top-two probability gap among the pixels whose label changed under the flip."""
    from nnunet_env import toy_case

    image, _ = toy_case(np.random.default_rng(1), *size)
    seg, probs = _predict(predictor, image)
    top2 = np.sort(probs, axis=0)[-2:]
    gap = top2[1] - top2[0]
    for axes in [(0,), (1,), (0, 1)]:
        seg_m, _ = _predict(predictor, np.flip(image, axes).copy())
        changed = np.flip(seg_m, axes) != seg
        yield float(gap[changed].max()) if changed.any() else 0.0


@pytest.fixture
def switched_off(monkeypatch):
    from nnunet_equiflex.nnunet_patch import SWITCH_ENV

    monkeypatch.setenv(SWITCH_ENV, "0")


@pytest.mark.parametrize("size", SINGLE_TILE_SIZES)
def test_nnunets_own_window_is_exact_where_padding_and_tiling_are_symmetric(predictor, switched_off, size):
    assert predictor.allowed_mirroring_axes is None  # one pass per tile, from the checkpoint
    for agreement, prob_error in _mirror_agreement(predictor, size):
        # Logits pass through nnU-Net's float16 buffer (one ulp is 0.016 at |logit| ~ 20), so a 1e-5
        # network difference can round one ulp apart; probabilities then differ by ~1e-3 at most.
        assert prob_error < 5e-3
        assert agreement > 0.999
    # A label may change only where two classes are tied to within that rounding (a CI run saw one such
    # pixel of 1760); a real shift of the flipped image would change pixels with a clear margin.
    assert max(_tie_margin(predictor, size)) < 5e-3


def test_nnunets_own_window_is_not_exact_on_odd_padding(predictor, switched_off):
    """What the patch fixes: an odd padding difference shifts the flipped image by one pixel in the padded frame."""
    assert min(agreement for agreement, _ in _mirror_agreement(predictor, (41, 45))) < 1.0
    assert max(_tie_margin(predictor, (41, 45))) > 5e-3  # not near-ties: the tie tolerance above can fail


def test_mirroring_tta_on_and_off_are_identical(predictor):
    from nnunet_env import toy_case

    image, _ = toy_case(np.random.default_rng(2), 53, 47)  # odd sizes: TTA mirrors the padded tile itself
    seg_off, probs_off = _predict(predictor, image)
    predictor.allowed_mirroring_axes = (0, 1)
    predictor.use_mirroring = True
    seg_on, probs_on = _predict(predictor, image)
    assert np.array_equal(seg_on, seg_off)
    assert np.abs(probs_on - probs_off).max() < 1e-4


ALL_TRAINERS = [
    "EquiFlexTrainer",
    "EquiFlexTrainer_5epochs",
    "EquiFlexTrainer_500epochs",
    "FlexTrainer",
    "EquiFlexTrainerViTS8",
    "EquiFlexTrainerFlip0",
    "EquiFlexTrainerFlip2",
    "EquiFlexTrainerFlip4",
    "EquiFlexTrainerViTTi8",
    "FlexTrainerFlip0",
    "EquiFlexTrainerTiny",
    "EquiFlexTrainerTiny_smoke",
    "FlexTrainerTiny_smoke",
    "nnUNetTrainer_budget",
    "EquiFlexTrainerFlip0_budget",
    "EquiFlexTrainerTiny_budget",
    "EquiFlexTrainerMini4",
    "EquiFlexTrainerMicro4_budget",
    "EquiFlexTrainerTinyLiftRef_budget",
    "EquiFlexTrainerTinyLift4_budget",
    "EquiFlexTrainerSmallLift4_budget",
    "EquiFlexTrainerTinyLiftHead_budget",
    "EquiFlexTrainerTiny3D",
    "EquiFlexTrainerViTS8_3D",
    "EquiFlexTrainerViTTi8_3D",
    "EquiFlexTrainerPretrained3D",
]
LOOKUP = (
    "import sys; from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find; "
    "print(' '.join(find(n).__name__ for n in sys.argv[1:]))"
)


def _lookup(names, env):
    done = subprocess.run([sys.executable, "-c", LOOKUP, *names], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1].split()


def test_ext_trainer_lookup_finds_ours_and_nnunets(tmp_path):
    env = nnunet_env(tmp_path)
    names = ALL_TRAINERS + ["nnUNetTrainer", "nnUNetTrainer_5epochs", "nnUNetTrainerNoMirroring"]
    assert _lookup(names, env) == names


def test_env_command_prints_the_export_line(tmp_path):
    env = nnunet_env(tmp_path)
    env.pop("nnUNet_extTrainer")
    out = run(["nnunet-equiflex", "env"], env)
    assert out.strip() == f'export nnUNet_extTrainer="{trainers_dir()}"'


def _snapshot(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_install_and_uninstall_shim_leave_nnunet_as_found(tmp_path):
    env = nnunet_env(tmp_path)
    env.pop("nnUNet_extTrainer")
    folder = nnunet_trainer_dir()
    _lookup(["nnUNetTrainer"], env)  # let Python write nnU-Net's own bytecode caches first
    before = _snapshot(folder)
    try:
        run(["nnunet-equiflex", "install-trainers"], env)
        assert (folder / SHIM_NAME).is_file()
        assert _lookup(["EquiFlexTrainer", "EquiFlexTrainerTiny_smoke", "nnUNetTrainer"], env) == [
            "EquiFlexTrainer",
            "EquiFlexTrainerTiny_smoke",
            "nnUNetTrainer",
        ]
    finally:
        run(["nnunet-equiflex", "uninstall-trainers"], env)
    assert _snapshot(folder) == before


def test_shim_never_breaks_nnunets_own_lookup(tmp_path):
    """If our package cannot be imported, the shim only warns."""
    from nnunet_equiflex.discovery import SHIM_SOURCE

    broken = tmp_path / "shim.py"
    broken.write_text(SHIM_SOURCE.replace("nnunet_equiflex.trainers", "nnunet_equiflex_missing"))
    done = subprocess.run([sys.executable, "-W", "always", str(broken)], capture_output=True, text=True)
    assert done.returncode == 0
    assert "trainers are unavailable" in done.stderr


def _load_plans(toy):
    folder = toy["root"] / "preprocessed" / toy["raw"].name
    plans = json.loads((folder / "EquiFlexPlans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    return plans, dataset_json


def test_3d_configuration_fails_fast_with_the_message(in_process_env):
    from nnunet_equiflex.trainers.equiflex_trainers import EquiFlexTrainerTiny_smoke

    plans, dataset_json = _load_plans(in_process_env)
    cfg = copy.deepcopy(plans["configurations"]["2d"])
    cfg["patch_size"] = [16, 48, 48]
    plans["configurations"]["3d_fullres"] = cfg
    plans["continue_training"] = False
    with pytest.raises(
        ValueError,
        match="EquiFlexTrainerTiny_smoke builds a 2D network; configuration '3d_fullres'.*-c 3d_fullres.*train '-c 2d'",
    ):
        EquiFlexTrainerTiny_smoke(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    assert not (
        in_process_env["root"]
        / "results"
        / in_process_env["raw"].name
        / "EquiFlexTrainerTiny_smoke__EquiFlexPlans__3d_fullres"
    ).exists()


def test_patch_size_off_the_token_grid_is_fixed_with_a_note(in_process_env):
    from nnunet_equiflex.trainers.equiflex_trainers import EquiFlexTrainerTiny_smoke

    plans, dataset_json = _load_plans(in_process_env)
    plans["configurations"]["2d"]["patch_size"] = [46, 50]
    plans["continue_training"] = False
    trainer = EquiFlexTrainerTiny_smoke(plans, "2d", 3, dataset_json, torch.device("cpu"))
    assert list(trainer.configuration_manager.patch_size) == [48, 52]
    assert trainer.plans_manager.plans["configurations"]["2d"]["patch_size"] == [48, 52]  # saved with the results
    with open(trainer.log_file) as f:
        assert "Note: patch size (46, 50) is not a multiple of the token size 4" in f.read()


def test_default_nnunet_plans_work_with_the_default_preset(in_process_env):
    """Without our planner: the default nnUNetPlans' CNN architecture is replaced by the default preset."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_equiflex.network import DEFAULT_PRESET, preset_kwargs
    from nnunet_equiflex.trainers.equiflex_trainers import EquiFlexTrainer

    folder = in_process_env["root"] / "preprocessed" / in_process_env["raw"].name
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    manager = PlansManager(plans)
    net = EquiFlexTrainer.build_network_architecture(manager, manager.get_configuration("2d"), 1, 3, True)
    expected = preset_kwargs(DEFAULT_PRESET)
    assert (len(net.encoder.blocks), net.encoder.embed_dim) == (expected["depth"], expected["embed_dim"])
    patch = manager.get_configuration("2d").patch_size
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 1, *patch)).shape == (1, 3, *patch)


@pytest.mark.parametrize("size,tile", [(s, t) for s in range(10, 120, 7) for t in (16, 48)] + [(81, 48), (97, 48)])
def test_symmetric_tile_starts(size, tile):
    from nnunet_equiflex.predictor import symmetric_steps

    starts = np.array(symmetric_steps(size, tile, 0.5))
    assert starts[0] == 0 and starts[-1] == max(size - tile, 0)
    assert np.all(starts + starts[::-1] == max(size - tile, 0))
    assert np.all(np.diff(starts) <= tile // 2 + 1)  # overlap at least as dense as nnU-Net's step 0.5


def test_symmetric_gaussian_is_mirror_symmetric():
    from nnunet_equiflex.predictor import symmetric_gaussian

    g = symmetric_gaussian((48, 47))
    assert torch.equal(g, g.flip(0)) and torch.equal(g, g.flip(1)) and g.min() > 0


@pytest.fixture(params=["nnUNetPredictor", "EquiFlexPredictor"])
def symmetric_predictor(request, in_process_env):
    if request.param == "nnUNetPredictor":
        return request.getfixturevalue("predictor")  # patched by our trainer module
    from nnunet_equiflex.predictor import EquiFlexPredictor

    return _cpu_predictor(EquiFlexPredictor, in_process_env["model_dir"])


@pytest.mark.parametrize("size", SINGLE_TILE_SIZES + MULTI_TILE_SIZES + [(41, 45), (53, 47), (81, 65), (97, 50)])
def test_predictor_is_mirror_exact_for_every_size(symmetric_predictor, size):
    """Odd padding, several tiles, rounded tile starts: all exact with the symmetric sliding window."""
    for agreement, prob_error in _mirror_agreement(symmetric_predictor, size):
        assert agreement == 1.0
        assert prob_error < 1e-4  # float32 accumulation: only the network's own rounding remains


def test_equiflex_predict_command_writes_nnunet_outputs(trained_toy):
    import SimpleITK as sitk

    out = trained_toy["root"] / "predictions_equiflex"
    run(
        [
            "nnunet-equiflex",
            "predict",
            "-i",
            str(trained_toy["raw"] / "imagesTs"),
            "-o",
            str(out),
            "-d",
            "901",
            "-c",
            "2d",
            "-tr",
            trained_toy["trainer"],
            "-p",
            "EquiFlexPlans",
            "-f",
            "0",
            "-device",
            "cpu",
        ],
        trained_toy["env"],
    )
    for reference in sorted(trained_toy["predictions"].glob("*.nii.gz")):
        ours, theirs = sitk.ReadImage(str(out / reference.name)), sitk.ReadImage(str(reference))
        assert ours.GetSize() == theirs.GetSize() and np.allclose(ours.GetOrigin(), theirs.GetOrigin())
        # Same model, another sliding window: the segmentations agree almost everywhere.
        assert np.mean(sitk.GetArrayFromImage(ours) == sitk.GetArrayFromImage(theirs)) > 0.99
